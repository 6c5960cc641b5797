"""A warm start for the tests' Python commands: one server process imports torch, megatron-core and
the trainer once; each command (`python pretrain_gpt.py ...`, `python -m tools.convert_hf ...`, a
forked multi-rank run, a `run_distributed` function) is then a fork of it instead of a fresh
interpreter that imports them again (about 3.5 s of CPU each on the 2-core CI machine; the suite
starts a few hundred).

What a command sees is what a fresh interpreter would give it: its own argv, environment, working
directory, stdin (/dev/null), stdout and stderr (files read back into a CompletedProcess), and its
own session (a timeout kills the whole process group). It runs the same entry file through runpy as
`__main__`, with every module as imported (nothing run yet) in the server. What differs is only
what happens at interpreter start: environment variables read during `import torch` (the server
starts with OMP_NUM_THREADS=1, as every test run does), and `sys.flags`. The tests whose subject is
the process boundary itself (launchers, signals, exit codes of torchrun) keep real processes.

`TESTS_WARM=0` turns it off: every command is then a fresh `subprocess.run` (for a side-by-side
measurement, or to rule the server out when a test fails).
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence

from tests.helpers.forkrun import exit_after, run_as_main

REPO = pathlib.Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("TESTS_WARM", "1") != "0"


def _serve(path: str) -> None:
    """The server: import once, then fork one child per request, one request at a time, until the
    client (its parent) is gone."""
    from tests.helpers.forkrun import _import_what_every_rank_imports

    _import_what_every_rank_imports()
    import torch._dynamo  # noqa: F401  (every run's torch.optim imports it at its first parameter group)

    import tools.convert_hf  # noqa: F401  (and with it the HF mapping)

    parent = os.getppid()
    _die_with_the_client()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        with conn, conn.makefile("rw") as stream:
            request = json.loads(stream.readline())
            # fork copies this thread only: another thread's held lock would stay held in the child
            assert threading.active_count() == 1, threading.enumerate()
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(request)
            _RUNNING[:] = [pid]
            stream.write(f"{pid}\n")
            stream.flush()
            _, status = os.waitpid(pid, 0)
            _RUNNING.clear()
            stream.write(f"{os.waitstatus_to_exitcode(status)}\n")
            stream.flush()


_RUNNING: list[int] = []  # the command running now (its pid = its process group)


def _die_with_the_client() -> None:
    """SIGTERM when the client (pytest) dies, however it dies; the server then takes the running
    command's whole process group with it, so a killed test session leaves no ranks behind."""
    import ctypes

    def stop(signum: int, frame: object) -> None:
        for pid in _RUNNING:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child(request: dict) -> None:
    """Becomes the requested command; never returns."""

    def become() -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
            target = os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_as_main(request["args"])

    exit_after(become)


def _read_line(conn: socket.socket) -> str:
    """One line from the server (it writes one at a time and waits, so nothing follows it)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            raise RuntimeError("the warm-start server closed the connection")
        data += chunk
    return data.decode()


class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.path = ""

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.path = os.path.join(tempfile.mkdtemp(prefix="warm-"), "socket")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.warm", self.path],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the warm-start server did not start (exit {self.proc.wait()})")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def run(self, args: list[str], cwd: str, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory(prefix="warm-run-") as tmp:
            self.start()
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            for name in (out, err):
                open(name, "w").close()
            request = dict(args=args, cwd=cwd, env=env, stdout=out, stderr=err)
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(self.path)
                conn.sendall((json.dumps(request) + "\n").encode())
                pid = int(_read_line(conn))
                conn.settimeout(timeout)
                try:
                    code, timed_out = int(_read_line(conn)), False
                except TimeoutError:
                    os.killpg(pid, signal.SIGKILL)
                    conn.settimeout(None)
                    code, timed_out = int(_read_line(conn)), True
            stdout, stderr = pathlib.Path(out).read_text(), pathlib.Path(err).read_text()
            if timed_out:
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout or 0, stdout, stderr)
            return subprocess.CompletedProcess([sys.executable, *args], code, stdout, stderr)


_SERVER = _Server()


def run_python(
    args: Sequence[str], cwd: str | os.PathLike = REPO, env: dict | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout)`, started warm: `args` is `script.py ...` or `-m module ...`."""
    args = [str(a) for a in args]
    if args[0].startswith("-") and args[0] != "-m":
        raise ValueError(f"run_python runs a script or -m module, not {args[0]}")
    env = dict(os.environ if env is None else env)
    if not ENABLED:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    return _SERVER.run(args, str(cwd), env, timeout)


if __name__ == "__main__":
    _serve(sys.argv[1])
