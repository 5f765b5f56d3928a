"""Helpers for tests that signal real subprocesses (imported by the test modules, like expected_rules)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def interrupt_while_torch_loads(cmd: list[str], timeout: float = 60, **popen: Any) -> tuple[int, str]:
    """Start ``cmd``, send SIGINT as soon as torch's library is mapped into it (its import has begun:
    seconds to go), and return (exit code, stderr); the process is killed and reaped whatever happens."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "torch was never loaded"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr
