"""The Python examples of the README and of the guides (docs/guides/*.md) run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
BLOCKS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_guides_have_examples():
    names = {page.relative_to(ROOT).as_posix() for page, _, _ in BLOCKS}
    assert {"README.md", "docs/guides/muon_nnx.md", "docs/guides/training.md"} <= names


@pytest.mark.parametrize(
    "page,index,code",
    BLOCKS,
    ids=[f"{page.relative_to(ROOT).as_posix()}[{i}]" for page, i, _ in BLOCKS],
)
def test_readme_block_runs(page, index, code):
    if "# not run" in code:
        pytest.skip("illustration only (marked '# not run')")
    name = f"{page.relative_to(ROOT).as_posix()}[python block {index}]"
    exec(compile(code, name, "exec"), {"__name__": "readme"})
