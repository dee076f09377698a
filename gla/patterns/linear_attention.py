"""Linear attention written in plain PyTorch: not yet recognized (see README, issue 3)."""
