from __future__ import annotations

import signal

import pytest
import torch

from mupt.cli import main

# The Ctrl-C tests send real SIGINTs to the commands they start.  A test run started in the
# background by a non-interactive shell (`cmd &`, nohup in a script) inherits SIGINT ignored, and so
# would every command it starts: the signal would never arrive and those tests would time out.  A
# handled (not ignored) SIGINT here is reset to the default in each child at exec, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the real CLI entry point in-process; returns (exit_code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
