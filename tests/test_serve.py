"""`llmslim serve`: the plan on every machine (pure), refusals through the command line, and real vLLM
servers started, queried with the `openai` client, compared with transformers and stopped."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_runner import Cli, run_cli
from conftest import REFERENCE

from llmslim import cpu
from llmslim.cli import main
from llmslim.cpu import FAMILIES, FAMILY_FEATURES
from llmslim.errors import UserError
from llmslim.formats.compressed import QuantScheme, quantization_config
from llmslim.serve import SERVER_MODULE, serve_plan, usage_commands

REF = json.loads((REFERENCE / "config.json").read_text())  # bf16 Llama, head_dim 32, context 512
# A Llama-3-8B-shaped config: 32 layers x 8 KV heads x head_dim 128, 128K context
BIG = {**REF, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
       "num_hidden_layers": 32, "max_position_embeddings": 131072}


def quantized(config: dict, scheme: QuantScheme) -> dict:
    """config.json as the exporter writes it for `scheme` (lm_head kept dense)."""
    return {**config, "quantization_config": quantization_config(scheme, ignore=["lm_head"])}


W8A8 = QuantScheme(8, -1, True, 8)
W4 = QuantScheme(4, 128)
EXPORTS = {"dense": REF, "w8a8": quantized(REF, W8A8), "weight_only": quantized(REF, W4)}
# family -> kind -> the --dtype served, or the start of the refusal line
CPU_PLANS = {
    "avx2": {"dense": "float32", "w8a8": "vLLM would serve wrong tokens", "weight_only": "vLLM cannot serve"},
    "avx2_vnni": {"dense": "float32", "w8a8": "float32", "weight_only": "vLLM cannot serve"},
    "avx512": {"dense": "float32", "w8a8": "vLLM would serve wrong tokens", "weight_only": "bfloat16"},
    "avx512_vnni": {"dense": "float32", "w8a8": "float32", "weight_only": "bfloat16"},
    "avx512_bf16": {"dense": "bfloat16", "w8a8": "float32", "weight_only": "bfloat16"},
    "amx": {"dense": "bfloat16", "w8a8": "bfloat16", "weight_only": "bfloat16"},
}


# ---------------------------------------------------------------- the plan (pure)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["dense", "w8a8", "weight_only"])
def test_cpu_plan_for_every_family(family, kind):
    expected = CPU_PLANS[family][kind]
    if not expected.startswith("vLLM"):
        plan = serve_plan(EXPORTS[kind], gpu=False, features=FAMILY_FEATURES[family])
        assert plan.args == [f"--dtype={expected}", "--max-model-len=512"]
        assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
        # why: a dense bf16 checkpoint served in float32 (no native bf16), a quantized one in 16 bits (its kernels)
        explained = expected == ("float32" if kind == "dense" else "bfloat16")
        assert any(n.startswith(f"--dtype {expected}: ") for n in plan.notes) == explained
        return
    with pytest.raises(UserError) as e:
        serve_plan(EXPORTS[kind], gpu=False, features=FAMILY_FEATURES[family])
    line = str(e.value)
    assert line.startswith(expected) and "\n" not in line
    assert ("AVX-512" if kind == "weight_only" else "VNNI") in line


def test_cpu_plan_reads_this_machine_when_no_features_are_given(monkeypatch):
    monkeypatch.setattr(cpu, "detect", lambda: FAMILY_FEATURES["amx"])
    assert serve_plan(EXPORTS["w8a8"], gpu=False).args[0] == "--dtype=bfloat16"
    monkeypatch.setattr(cpu, "detect", lambda: FAMILY_FEATURES["avx2"])
    with pytest.raises(UserError, match="AVX-512"):
        serve_plan(EXPORTS["weight_only"], gpu=False)


def test_gpu_plan_serves_everything_quantized_in_16_bits():
    assert serve_plan(REF, gpu=True).args == ["--max-model-len=512"]  # dense: the checkpoint's dtype
    for kind in ("w8a8", "weight_only"):
        plan = serve_plan(EXPORTS[kind], gpu=True)
        assert plan.args == ["--dtype=bfloat16", "--max-model-len=512"] and plan.env == {}
        assert "16-bit activations" in plan.notes[0]
    fp16 = {**EXPORTS["weight_only"], "dtype": "float16"}
    assert serve_plan(fp16, gpu=True).args[0] == "--dtype=float16"
    # vLLM's CPU attention has no kernel for head_dim 8; a GPU serves it
    small_heads = {**REF, "head_dim": 8}
    assert serve_plan(small_heads, gpu=True).args == ["--max-model-len=512"]
    with pytest.raises(UserError, match=r"^head_dim 8 is not supported by vLLM's CPU attention.*on a GPU$"):
        serve_plan(small_heads, gpu=False, features=FAMILY_FEATURES["amx"])
    assert serve_plan(BIG, gpu=True, kv_cache_gib=2).args[-1] == f"--kv-cache-memory-bytes={2 * 2**30}"


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("bits", [3, 8])
def test_weight_bits_vllm_does_not_load_here_are_refused_in_one_line(bits, gpu):
    """vLLM 0.32 loads 4- and 8-bit compressed-tensors weights, weight-only on a CPU 4-bit only; anything else
    failed deep in its engine start (a 3-bit QAT export of SmolLM2), so the plan refuses it first."""
    config = quantized(REF, QuantScheme(bits, 64))
    if bits == 8 and gpu:
        assert serve_plan(config, gpu=True).args  # W8A16 is served on GPUs
        return
    with pytest.raises(UserError) as e:
        serve_plan(config, gpu=gpu, features=FAMILY_FEATURES["amx"])
    assert f"this export stores {bits}-bit weights (weight-only)" in str(e.value) and "\n" not in str(e.value)
    assert ("serve it on a GPU" in str(e.value)) == (bits == 8 and not gpu)
    assert serve_plan(quantized(REF, QuantScheme(4, 64)), gpu=gpu, features=FAMILY_FEATURES["amx"]).args


def test_max_model_len_is_the_context_capped_at_8192_and_never_beyond_it():
    avx2 = FAMILY_FEATURES["avx2"]
    assert "--max-model-len=8192" in serve_plan(BIG, gpu=True).args  # 128K context: capped
    assert "--max-model-len=131072" in serve_plan(BIG, gpu=True, max_model_len=131072).args
    assert "--max-model-len=256" in serve_plan(REF, gpu=False, features=avx2, max_model_len=256).args
    with pytest.raises(UserError, match=r"^--max-model-len 1024 exceeds the model's context \(512, "):
        serve_plan(REF, gpu=False, features=avx2, max_model_len=1024)
    with pytest.raises(UserError, match="must be a positive number"):
        serve_plan(REF, gpu=True, max_model_len=0)


def test_cpu_kv_cache_holds_four_sequences_of_the_served_length():
    # BIG: 2 (K, V) x 32 layers x 8 heads x 128 = 65536 values a token: 128 KiB in bf16, 256 KiB in float32
    bf16, avx2 = FAMILY_FEATURES["avx512_bf16"], FAMILY_FEATURES["avx2"]
    assert serve_plan(BIG, gpu=False, features=bf16).env == {"VLLM_CPU_KVCACHE_SPACE": "4"}  # 4 x 8192 x 128 KiB
    assert serve_plan(BIG, gpu=False, features=avx2).env == {"VLLM_CPU_KVCACHE_SPACE": "8"}  # float32
    assert serve_plan(BIG, gpu=False, features=bf16, max_model_len=4096).env == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    plan = serve_plan(BIG, gpu=False, features=bf16, kv_cache_gib=3)
    assert plan.env == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    assert "KV cache 3 GiB (VLLM_CPU_KVCACHE_SPACE): 24576 tokens, 3 sequences of 8192" in plan.notes
    # the reference model needs 6 MiB for 4 x 512 tokens: vllm-cpu's smallest size, 1 GiB
    assert serve_plan(REF, gpu=False, features=avx2).env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_cpu_kv_cache_refusals():
    avx2 = FAMILY_FEATURES["avx2"]
    with pytest.raises(UserError, match=r"^--kv-cache-gib 1 holds 4096 tokens, fewer than one sequence of 8192"):
        serve_plan(BIG, gpu=False, features=avx2, kv_cache_gib=1)
    assert serve_plan(BIG, gpu=False, features=avx2, kv_cache_gib=1, max_model_len=4096).env == \
        {"VLLM_CPU_KVCACHE_SPACE": "1"}
    for gib in (0.5, 1.5, 0):
        with pytest.raises(UserError, match="whole number of GiB"):
            serve_plan(REF, gpu=False, features=avx2, kv_cache_gib=gib)


def test_usage_commands_for_the_model_card():
    out = usage_commands("me/ref-slim", REF)
    assert out == {
        "gpu": "vllm serve me/ref-slim --max-model-len=512",
        "cpu": f"VLLM_CPU_KVCACHE_SPACE=1 python -m {SERVER_MODULE} --model me/ref-slim --dtype=bfloat16 "
               "--max-model-len=512",
        "llmslim": "llmslim serve me/ref-slim",
    }
    w4 = usage_commands("me/ref-w4", EXPORTS["weight_only"])
    assert w4["gpu"] == "vllm serve me/ref-w4 --dtype=bfloat16 --max-model-len=512"
    assert "--dtype=bfloat16" in w4["cpu"]
    assert set(usage_commands("m", {**REF, "head_dim": 8})) == {"gpu", "llmslim"}  # no CPU kernel: no CPU line


# ---------------------------------------------------------------- the command line, before any server


def export_dir(path: Path, config: dict) -> Path:
    """A directory with only config.json: enough for everything `serve` decides before vLLM starts."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_dry_run_prints_the_command_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "detect", lambda: FAMILY_FEATURES["avx512"])
    d = export_dir(tmp_path / "w4", EXPORTS["weight_only"])
    assert main(["serve", str(d), "--port", "9123", "--dry-run", "--quiet", "--", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"VLLM_CPU_KVCACHE_SPACE=1 {sys.executable} -m {SERVER_MODULE} --model {d} --host=127.0.0.1 " \
           "--port=9123 --dtype=bfloat16 --max-model-len=512 --seed 3\n" in out
    assert "weight-only CPU kernel takes bf16/fp16" in out and "serving" not in out


def test_weight_only_int4_on_an_avx2_cpu_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "detect", lambda: FAMILY_FEATURES["avx2"])
    d = export_dir(tmp_path / "w4", EXPORTS["weight_only"])
    assert main(["serve", str(d), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [captured.err.strip()]
    assert "vLLM cannot serve this export on this CPU" in captured.err and "AVX-512" in captured.err
    assert SERVER_MODULE not in captured.out  # refused before any command


@pytest.mark.parametrize("argv, message", [
    (["{small_heads}"], "error: head_dim 8 is not supported by vLLM's CPU attention"),
    (["{ref}", "--max-model-len", "4096"], "error: --max-model-len 4096 exceeds the model's context (512"),
    (["/no/such/export"], "error: /no/such/export: no such directory"),
    (["{empty}"], "not a model directory (no config.json)"),
    (["{ref}", "--port", "{busy}"], "error: port {busy} on 127.0.0.1 is not free (Address already in use)"),
])
def test_refusals_exit_2_with_one_line(tmp_path, argv, message):
    small_heads = export_dir(tmp_path / "small-heads", {**REF, "head_dim": 8})
    (tmp_path / "empty").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        names = {"small_heads": small_heads, "ref": REFERENCE, "empty": tmp_path / "empty",
                 "busy": busy.getsockname()[1]}
        rc, out = run_cli("serve", *[a.format(**names) for a in argv], "--quiet", timeout=120)
    assert rc == 2, out
    assert error_lines(out) == [out.strip().splitlines()[-1]] and message.format(**names) in out, out
    assert "Traceback" not in out


# ---------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cli: Cli, text: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while text not in cli.output:
        assert cli.poll() is None, f"llmslim serve exited with {cli.poll()}:\n{cli.output[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{cli.output[-3000:]}"
        time.sleep(0.5)


def end(processes: list[psutil.Process]) -> None:
    """After a failed test: SIGKILL whatever the command started that still runs."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def assert_all_gone(processes: list[psutil.Process], port: int) -> None:
    """Every process the command started has ended, and nothing listens on its port."""
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on port {port}"


@pytest.mark.vllm
def test_serve_answers_openai_clients_with_transformers_greedy_tokens_and_stops_on_ctrl_c():
    import openai

    from llmslim.check import PROMPTS, greedy, load_for_check, near_tie_violations
    from llmslim.loading import load_tokenizer

    port = free_port()
    # --enforce-eager: no torch.compile, which would add about a minute to this start on 2 cores
    cli = Cli(["serve", str(REFERENCE), "--port", str(port), "--served-model-name", "ref", "--quiet",
               "--", "--enforce-eager"])
    started: list[psutil.Process] = []
    try:
        wait_for(cli, f"serving {REFERENCE} at http://127.0.0.1:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
        started = psutil.Process(cli.pid).children(recursive=True)
        assert any("EngineCore" in " ".join(p.cmdline()) for p in started)  # vLLM's engine: a process of its own
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["ref"]
        reply = client.completions.create(model="ref", prompt=PROMPTS, max_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
        choices = sorted(reply.choices, key=lambda c: c.index)
        served = [c.token_ids for c in choices]
        tokenizer = load_tokenizer(REFERENCE)
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        assert [c.prompt_token_ids for c in choices] == prompts  # the server tokenizes as transformers does
        assert all(len(t) == 16 for t in served) and all(c.text for c in choices)
        model = load_for_check(REFERENCE)
        dtype = serve_plan(REF, gpu=False).args[0]
        if dtype == "--dtype=float32":  # this CPU has no native bf16: both sides compute in float32
            assert served == greedy(model, prompts, 16)
        else:  # bf16 on this CPU: vLLM's token may take the other side of a near-tie
            assert near_tie_violations(model, prompts, served)[0] == []
        cli.interrupt()  # Ctrl-C
        assert cli.wait(60) == 130
    finally:
        cli.kill()
        if cli.poll() is None or cli.poll() != 130:
            end(started)
    assert_all_gone(started, port)
    assert "stopping the server (Ctrl-C)" in cli.output
    cli.close()


def test_a_server_that_dies_while_starting_gives_one_line_with_its_last_words(monkeypatch):
    """The start-up path with a real process that fails as vLLM's server does on a bad flag (argparse's
    usage line, exit 2): no vLLM import (~15 s), the same waiting, log forwarding and error."""
    import llmslim.serve as serving

    dying = "import sys; print('usage: api_server.py [-h]'); print('error: unrecognized arguments: --bad'); sys.exit(2)"
    monkeypatch.setattr(serving, "server_command", lambda *a, **k: [sys.executable, "-c", dying])
    with pytest.raises(serving.ServeError) as e:
        serving.serve(str(REFERENCE), port=free_port(), gpu=False, features=FAMILY_FEATURES["avx2"],
                      say=lambda _: None, start_timeout=60)
    message = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in message
    assert message.startswith("vLLM's server exited while starting with exit code 2; its last lines:")
    assert "error: unrecognized arguments: --bad" in message


# A stand-in for vLLM's server: answers /health, and dies of SIGTERM as vLLM's API server does.
HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""

# `llmslim serve` with the stand-in server; with "refused", libc's prctl fails as under a seccomp policy
# that forbids it (returns -1, errno EPERM): the call itself fails, whatever code makes it.
SERVE_DRIVER = """
import ctypes, logging, sys
import llmslim.serve as serving
from llmslim.cpu import FAMILY_FEATURES

model, port, mode, health = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stdout)
if mode == "refused":
    real = ctypes.CDLL

    class RefusingLibc:
        def __init__(self, *args, **kwargs):
            self._lib = real(*args, **kwargs)

        def __getattr__(self, name):
            if name == "prctl":
                return lambda *args: (ctypes.set_errno(1), -1)[1]
            return getattr(self._lib, name)

    ctypes.CDLL = RefusingLibc
serving.server_command = lambda *a, port, **k: [sys.executable, "-c", open(health).read(), str(port)]
serving.serve(model, port=port, gpu=False, features=FAMILY_FEATURES["avx2"], say=lambda t: print(t, flush=True))
"""


@pytest.mark.parametrize("prctl", ["works", "refused"])
def test_no_server_outlives_a_killed_llmslim_serve(tmp_path, prctl):
    """SIGKILL `llmslim serve` (no handler runs): the server it started must end within seconds, through the
    kernel's parent-death signal, or where prctl is refused, through the watchdog (with a warning)."""
    import os
    import signal
    import subprocess

    (tmp_path / "driver.py").write_text(SERVE_DRIVER)
    (tmp_path / "health.py").write_text(HEALTH_SERVER)
    port, log = free_port(), tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(REFERENCE), str(port), prctl,
                                 str(tmp_path / "health.py")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while "serving " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        servers = [p for p in started if "Health" in " ".join(p.cmdline())]
        watchdogs = [p for p in started if "llmslim.watchdog" in p.cmdline()]
        assert len(servers) == 1, [p.cmdline() for p in started]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(servers, timeout=5)
        assert not alive, f"the server outlived llmslim serve by 5 s ({prctl})"
        print(f"server gone {time.monotonic() - killed:.2f} s after SIGKILL ({prctl})")
        assert len(watchdogs) == (prctl == "refused"), [p.cmdline() for p in started]
        warning = ("WARNING the kernel refused prctl(PR_SET_PDEATHSIG) for the server: a watchdog process will "
                   "stop the server if llmslim dies")
        assert (warning in log.read_text()) == (prctl == "refused"), log.read_text()
        _, alive = psutil.wait_procs(started, timeout=5)  # the watchdog too, once its work is done
        assert not alive, [p.cmdline() for p in alive]
    finally:
        end(started)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
