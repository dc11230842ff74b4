"""The documentation's code runs as pasted.

Every ```python block of README.md and docs/*.md is executed, each in a fresh
namespace, in the order of the page. A block that cannot run here (it needs
several processes, a GPU or a file the reader has) is fenced ```python no-run
instead, which GitHub still highlights as Python.
"""

from __future__ import annotations

import os
import re

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.join("docs", name)
    for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md")
)
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as file:
        return BLOCK.findall(file.read())


CASES = [
    pytest.param(page, index, code, id=f"{page}#{index}")
    for page in PAGES
    for index, code in enumerate(blocks(page))
]


def test_the_docs_have_runnable_examples():
    assert any(page == "README.md" for page, *_ in (case.values for case in CASES))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the docs' examples are run on TensorFlow"
)
@pytest.mark.parametrize("page, index, code", CASES)
def test_code_block_runs_as_pasted(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.utils.clear_session()
    exec(compile(code, f"{page} (python block {index})", "exec"), {"__name__": "__main__"})
