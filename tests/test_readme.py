"""The README's Flax usage example runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- The block below is executed by tests/test_readme.py. -->"


def test_usage_example_runs():
    text = README.read_text()
    assert MARKER in text
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    assert namespace["y"].shape == (8, 16, 81)
    assert set(namespace["variables"]) == {"params", "batch_stats"}
    assert namespace["h"].shape == (1, 81)
    assert len(namespace["stack_variables"]["params"]) == 3
