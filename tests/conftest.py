import os
import shutil

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Without a GPU the Triton kernels run in the interpreter; it must be chosen before anything imports
# triton (torch._dynamo does), or triton.language's own jitted helpers are compiled-mode objects.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with Dynamo's caches empty and leaves no user pattern behind."""
    import gla

    torch._dynamo.reset()
    with gla.pattern_scope():
        yield
    torch._dynamo.reset()
