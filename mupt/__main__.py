"""``python -m mupt``: the command line (also how torchrun starts the workers of ``mupt scale``)."""

from __future__ import annotations

import os
import sys

try:
    from mupt.cli import main
except KeyboardInterrupt:  # Ctrl-C while the modules load (torch takes seconds): nothing had started
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # a torchrun worker says nothing: its launcher says it once
        print("interrupted (Ctrl-C) while starting: nothing was done", file=sys.stderr)
    sys.exit(130)

main()
