"""``embforge serve`` in a child process on a free loopback port, for scripts, benchmarks and tests.

proc, url = start_server("all-MiniLM-L6-v2", "--precision", "fp32")
...  # POST {url}/v1/embeddings
stop_server(proc)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | Sequence[str], *flags: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """Start ``embforge serve MODEL [MODEL ...] FLAGS`` and wait until ``/health`` answers 200; -> (process, base URL).

    Raises:
        RuntimeError: the server exited (its last output is in the message) or did not come up in time.
    """
    port = free_port()
    models = [model] if isinstance(model, str) else list(model)
    cmd = [sys.executable, "-m", "embforge", "serve", *models, *flags, "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                if reply.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout_s:g} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> bool:
    """SIGTERM; True when the server shut down by itself (uvicorn re-raises the signal once it is done)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s) in (0, -signal.SIGTERM)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
