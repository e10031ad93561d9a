"""The README's Python example runs as written, through the public API."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_from_python_example_runs():
    if not README.exists():
        pytest.skip("not a checkout")
    section = README.read_text().split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert tuple(result.images.shape) == (8, 3, 32, 32)
    assert set(result.trace[0][-1]["energy"]) == {"red", "mask"}
