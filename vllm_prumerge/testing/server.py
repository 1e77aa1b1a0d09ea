"""Start `vllm serve` as a subprocess on loopback and wait until it answers (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` CLI of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else (shutil.which("vllm") or "vllm")


@contextlib.contextmanager
def serve(
    model: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    log_path: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Run `vllm serve MODEL --host 127.0.0.1 --port PORT *args`; yield its base URL.

    The server's output goes to `log_path` (a temporary file by default; its tail is shown if
    the server dies before answering). The server is stopped (SIGINT, then SIGKILL) on exit.
    """
    port = port or free_port()
    cmd = [
        vllm_executable(),
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    full_env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu"),
        **(env or {}),
    }
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(
            open(log_path, "w+b")  # noqa: SIM115  entered into the ExitStack
            if log_path
            else tempfile.TemporaryFile(prefix="vllm-serve-")  # noqa: SIM115  likewise
        )
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        stack.callback(_stop, proc)
        yield _wait_until_healthy(proc, log_file, f"http://127.0.0.1:{port}", timeout, cmd)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the server's process group, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_until_healthy(proc, log_file, base_url: str, timeout: float, cmd) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log_file.seek(0)
            tail = log_file.read().decode(errors="replace")[-6000:]
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return base_url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vllm serve did not answer within {timeout} s: {cmd}")
        time.sleep(1.0)
