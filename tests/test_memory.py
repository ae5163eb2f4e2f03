"""Host-memory helpers: the allocator setting that keeps layer-by-layer work flat in model depth."""

import ctypes.util
import subprocess
import sys

import pytest

# In a fresh process: free one 30 MiB block (glibc's dynamic threshold then rises to 30 MiB), allocate
# 20 MiB, and print how many bytes malloc serves by mmap (mallinfo2().hblkhd) before and after.
PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "set":
    from llmslim.memory import keep_large_buffers_out_of_the_heap
    assert keep_large_buffers_out_of_the_heap()
libc.free(libc.malloc(30 << 20))
before = libc.mallinfo2().hblkhd
p = libc.malloc(20 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(p)
"""


def mmapped_bytes_of_a_20_mib_block(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc only")
def test_large_buffers_stay_out_of_the_heap_after_a_larger_free():
    assert mmapped_bytes_of_a_20_mib_block("default") == 0  # glibc's default: into the heap, where it fragments
    assert mmapped_bytes_of_a_20_mib_block("set") >= 20 << 20
