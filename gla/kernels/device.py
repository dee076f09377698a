"""Can a Triton kernel run on these tensors? One answer for every kernel (device and interpreter)."""
import os


def interpreting() -> bool:
    """Triton's interpreter is on (set by gla.kernels on machines without CUDA, or by the user)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_device_reason(*tensors, kernel: str) -> str | None:
    """None when every tensor is on one CUDA device (or on the CPU under the interpreter), else why not.

    ``None`` entries (absent optional inputs) are skipped; only ``.device`` is read (FakeTensors work).
    """
    present = [t for t in tensors if t is not None]
    for t in present:
        kind = t.device.type
        if kind == "cpu" and not interpreting():
            return "tensors on cpu: Triton needs CUDA (or TRITON_INTERPRET=1)"
        if kind not in ("cpu", "cuda"):
            return f"tensors on {kind}: the Triton {kernel} kernel needs CUDA"
    devices = {t.device for t in present}
    if len(devices) > 1:
        return f"tensors on several devices ({', '.join(sorted(map(str, devices)))})"
    return None
