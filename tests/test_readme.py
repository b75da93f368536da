"""Every ```python block of README.md runs as written, each on its own (a fresh namespace per block)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[str, str]]:
    """(the heading above the block and its index under it, the block's code), in README order."""
    blocks, heading, count = [], "top", 0
    for match in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", open(README).read(), re.MULTILINE | re.DOTALL):
        if match.group(1):
            heading, count = match.group(1).lstrip("# "), 0
        else:
            count += 1
            blocks.append((f"{heading} [{count}]", match.group(2)))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 9, [name for name, _ in BLOCKS]


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_block_runs(code):
    exec(compile(code, README, "exec"), {"__name__": "readme"})
