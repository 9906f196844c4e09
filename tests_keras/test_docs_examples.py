"""Every ```python block of docs/keras.md runs, in order, in one namespace, in a fresh process
(repository root as working directory), in the TensorFlow/Keras test process's world.

The block extraction and runner are the torch side's (``tests/test_docs_examples.py``), loaded
by path: that module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import pytest
from keras_helpers import REPO, load_by_path

_docs = load_by_path("ano_test_docs_examples", REPO / "tests" / "test_docs_examples.py")
KERAS_PAGES = sorted(_docs.KERAS_PAGES)


def test_keras_pages_exist():
    for page in KERAS_PAGES:
        assert (REPO / "docs" / page).is_file(), page


@pytest.mark.parametrize("page", KERAS_PAGES)
def test_keras_page_examples_run(page: str) -> None:
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    blocks = _docs.python_blocks(text, f"docs/{page}")
    assert blocks, f"docs/{page} has no python example"
    result = _docs.run_blocks(blocks, timeout=240)
    assert result.returncode == 0, (
        f"a python example in docs/{page} failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    )
    assert "Ano" in result.stdout
