"""mupt: tune a small proxy Mamba, transfer to a wide model with µP-SSM width rules, verify, launch."""

from __future__ import annotations

__version__ = "0.1.0"
