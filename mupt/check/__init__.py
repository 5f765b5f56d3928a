"""Pass/fail verification: coordinate checks (coord) and LR-transfer checks (lr_transfer)."""
