"""Where benchmark tables go, and the GPU precondition every GPU benchmark states."""
import os
import re

import torch


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"benchmarks/{script} needs a CUDA GPU: torch.cuda.is_available() is False on this "
                           "machine (the Triton interpreter is far too slow to time anything).")


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3`` (result file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def out_dir_arg(argv: list[str]) -> str:
    """A script's output directory: its first argument, else ``benchmarks/results``."""
    return argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results")


def write_table(out_dir: str, stem: str, device_name: str, text: str) -> str:
    """Write ``{out_dir}/{stem}-{device}.md``; return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}-{device_slug(device_name)}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_text(out_dir: str | None, name: str, lines) -> str:
    """``lines`` joined as one text; written to ``{out_dir}/{name}`` when ``out_dir`` is given."""
    text = "\n".join(lines) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return text
