"""``python -m mupt`` and the ``mupt`` console script (also how torchrun starts the workers of ``mupt scale``).

The command line's modules (torch among them) take seconds to load: :func:`run` imports them inside its own
Ctrl-C handling, so a Ctrl-C pressed meanwhile is one line, not a traceback.
"""

from __future__ import annotations

import os
import sys


def run() -> None:
    """Load the command line and run it (:func:`mupt.cli.main`); Ctrl-C while it loads: one line, exit 130."""
    try:
        from mupt.cli import main
    except KeyboardInterrupt:  # nothing had started
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # a torchrun worker says nothing: its launcher says it once
            print("interrupted (Ctrl-C) while starting: nothing was done", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
