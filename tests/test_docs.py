"""The documentation's code runs as pasted.

The ```python blocks of each page (README.md, docs/*.md) run in the order of
the page in one namespace, as a reader pasting the page into one session
would run them. A block that cannot run here (it needs several processes, a
GPU or a file the reader has) is fenced ```python no-run instead, which
GitHub still highlights as Python. Blocks that use KerasHub run where it is
installed (CI installs it).
"""

from __future__ import annotations

import importlib.util
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


PAGES_WITH_CODE = [page for page in PAGES if blocks(page)]


def test_the_readme_has_runnable_examples():
    assert blocks("README.md")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the docs' examples are run on TensorFlow"
)
@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_code_blocks_run_as_pasted(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.utils.clear_session()
    namespace = {"__name__": "__main__"}
    for index, code in enumerate(blocks(page)):
        if "keras_hub" in code and importlib.util.find_spec("keras_hub") is None:
            continue
        exec(compile(code, f"{page} (python block {index})", "exec"), namespace)
