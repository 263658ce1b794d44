"""The README's Python example runs as written.

The code is the first ``python`` block under the heading "## Python API" in
README.md; while the README has no such section, the copy below (the same
text) runs instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Python API"

EXAMPLE = """\
import torch
from acnet_convert import fuse_and_load
from acnet_convert.zoo import build_arch

# A net trained with ACBlocks (untrained here, to keep the example short) and its checkpoint.
train_net = build_arch("cfqkbnc", "train").eval()
torch.save(train_net.state_dict(), "cfqkbnc_train.pth")

# The plain baseline net: one conv and one BN per unit, no ACBlocks.
net = build_arch("cfqkbnc", "baseline").eval()
report = fuse_and_load(net, "cfqkbnc_train.pth")
print(report.layout, report.blocks_fused)  # baseline 3

x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    torch.testing.assert_close(net(x), train_net(x), rtol=1e-4, atol=1e-5)
"""


def python_example(readme: str) -> str | None:
    """The first python code block of the "## Python API" section, or None without one."""
    lines = readme.splitlines()
    if HEADING not in (line.rstrip() for line in lines):
        return None
    start = [line.rstrip() for line in lines].index(HEADING) + 1
    section = []
    for line in lines[start:]:
        if line.startswith("## "):
            break
        section.append(line)
    block = re.search(r"^```python\n(.*?)^```", "\n".join(section) + "\n", re.S | re.M)
    if block is None:
        raise AssertionError(f"README.md: '{HEADING}' has no ```python code block")
    return block.group(1)


def test_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = python_example(README.read_text(encoding="utf-8")) or EXAMPLE
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint into the current folder
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "cfqkbnc_train.pth").exists() or "cfqkbnc" not in code


def test_example_extraction() -> None:
    readme = f"# x\n\n{HEADING}\n\ntext\n\n```python\nprint(1)\n```\n\n```python\nno\n```\n"
    readme += "## Next\n"
    assert python_example(readme) == "print(1)\n"
    assert python_example("# x\n\n## Other\n") is None
    with pytest.raises(AssertionError, match="no ```python"):
        python_example(f"{HEADING}\n\n```\nshell\n```\n## Next\n```python\nx\n```\n")
