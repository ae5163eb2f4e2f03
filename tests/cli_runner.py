"""`llmslim ...` in a child process that starts in milliseconds instead of seconds.

A plain `python -m llmslim.cli` spends about 9 s of a 2-core machine importing torch and transformers,
which made the tests that must run the command line in a process of its own (SIGKILL, SIGINT, exit
codes) the slowest part of the suite. Children here are forked from a multiprocessing forkserver that
imported those libraries once (and never ran a parallel torch op, so no OpenMP pool is inherited); each
child then runs the real `llmslim.cli.main(argv)`, in its own session (so a kill takes vLLM's engine with
it), with its output in a file. Signals, exit codes and crashes are those of a real process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import tempfile
from pathlib import Path

from llmslim.registry import METHODS

# the method implementations too: the registry imports them only when a stage is planned
PRELOAD = ["torch", "transformers", "llmslim.cli", "llmslim.pipeline", "llmslim.publish", "llmslim.check",
           *sorted({m.run.partition(":")[0] for m in METHODS.values() if m.run})]
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _child(argv: list[str], log: str, env: dict[str, str | None], cwd: str | None) -> None:
    os.setsid()
    # Ctrl-C as in a terminal: a shell ignores SIGINT in what it starts in the background (`pytest &`),
    # and Python keeps an ignored SIGINT ignored, which would make the Ctrl-C tests see nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if cwd:
        os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from llmslim.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # a bug: print the traceback as the interpreter would, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Cli:
    """A running `llmslim` child: `.wait()`, `.kill()`, `.interrupt()`, `.output`."""

    def __init__(self, argv: list[str], env: dict[str, str | None] | None = None, cwd: str | Path | None = None):
        fd, self.log = tempfile.mkstemp(prefix="llmslim-cli-", suffix=".log")
        os.close(fd)
        self.proc = _context().Process(target=_child, args=(list(argv), self.log, dict(env or {}),
                                                             str(cwd) if cwd else None))
        self.proc.start()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = 900) -> int:
        """The exit code (negative: the signal that ended it); raises TimeoutError when still running."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise TimeoutError(f"llmslim still running after {timeout} s")
        return self.proc.exitcode

    def kill(self) -> None:
        """SIGKILL the child and everything it started (vLLM's engine)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def interrupt(self) -> None:
        os.kill(self.pid, signal.SIGINT)

    @property
    def output(self) -> str:
        return Path(self.log).read_text(errors="replace")

    def close(self) -> None:
        Path(self.log).unlink(missing_ok=True)


def run_cli(*argv: str, env: dict[str, str | None] | None = None, kill_after: float | None = None,
            timeout: float = 900, cwd: str | Path | None = None) -> tuple[int, str]:
    """Run `llmslim ARGV...`; SIGKILL it after `kill_after` seconds if given. Returns (exit code, output)."""
    cli = Cli(list(argv), env, cwd)
    try:
        try:
            rc = cli.wait(kill_after if kill_after is not None else timeout)
        except TimeoutError:
            if kill_after is None:
                cli.kill()
                raise
            cli.kill()
            rc = cli.wait(60)
        return rc, cli.output
    finally:
        cli.close()
