"""Kill -9 a child process at a chosen point: it writes a signal file there and hangs; we SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_9_when_signalled(code: str, args: list[str], signal_file: Path, what: str, timeout_s: float = 300) -> None:
    """Run ``python -c code *args``; once ``signal_file`` exists, SIGKILL it (fail if it exits or times out first)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert signal_file.exists(), f"the child never reached {what}: " + (
            child.stderr.read().decode()[-2000:] if child.poll() is not None else "still running")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
