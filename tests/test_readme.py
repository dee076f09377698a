"""The README's code blocks that are self-contained run as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def test_kernels_as_functions_snippet_runs():
    block = re.search(r"```python\n(.*?)```", _section("The kernels as functions"), re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["o"].shape == (2, 100, 4, 32)
    assert scope["o1"].shape == (2, 1, 4, 32) and scope["state"].shape == (2, 4, 32, 32)
    assert scope["y"].shape == (8, 64)
