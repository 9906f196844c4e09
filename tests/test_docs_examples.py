"""Every ```python block of the documentation runs, so the examples cannot rot.

Each page's blocks run in order, in one namespace, in a fresh subprocess whose working directory
is the repository root. Pages are discovered by glob, so a new page is covered as soon as it is
added. ``docs/keras.md`` imports TensorFlow, which must not share a process with triton: the
Keras test process runs that page (tests_keras/).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KERAS_PAGES = {"keras.md"}

# A fenced block opened by ```python (optionally with attributes, e.g. ```python title="x")
# at the start of a line, closed by the next ``` line.
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Runs the blocks it reads as JSON from stdin; each block is compiled with the page name and
# its first line number, so a traceback points at the line of the page that failed.
_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for block in json.load(sys.stdin):
    code = "\\n" * (block["line"] - 1) + block["source"]
    exec(compile(code, block["page"], "exec"), namespace)
"""


def python_blocks(text: str, page: str) -> list[dict]:
    """The ```python blocks of a Markdown page, with the page line their code starts on."""
    return [
        {"page": page, "line": text.count("\n", 0, match.start(1)) + 1, "source": match.group(1)}
        for match in _BLOCK.finditer(text)
    ]


def run_blocks(
    blocks: list[dict], timeout: float = 120, temp_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``blocks`` in a fresh process; with ``temp_dir``, its temporary directory (what an
    example leaves there, as Stable-Baselines3's default logger does, goes to pytest's) but
    Inductor's compiled-kernel cache where it was."""
    env = None
    if temp_dir is not None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        env = {**os.environ, "TMPDIR": str(temp_dir), "TORCHINDUCTOR_CACHE_DIR": cache_dir()}
    return subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(blocks),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pages_with_code() -> list[Path]:
    pages = sorted(p for p in DOCS.glob("*.md") if p.name not in KERAS_PAGES)
    return [p for p in pages if python_blocks(p.read_text(encoding="utf-8"), p.name)]


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"), f"docs/{page.name}")
    result = run_blocks(blocks, temp_dir=tmp_path)
    assert result.returncode == 0, (
        f"a python example in docs/{page.name} failed:\n{result.stdout}\n{result.stderr}"
    )


def test_blocks_share_a_namespace_and_report_the_failing_page_line() -> None:
    page = (
        "# t\n\n"
        "```python\nvalue = 41\n```\n\n"
        "```bash\nexit 1\n```\n\n"
        '```python title="second"\nvalue += 1\nassert value == 42\n'
        "raise RuntimeError(f'value is {value}')\n```\n"
    )
    blocks = python_blocks(page, "docs/example.md")
    assert [b["line"] for b in blocks] == [4, 12]
    result = run_blocks(blocks)
    assert result.returncode == 1
    assert 'File "docs/example.md", line 14' in result.stderr
    assert "RuntimeError: value is 42" in result.stderr


def test_every_page_is_in_the_site_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def files(node) -> set[str]:
        if isinstance(node, str):
            return {node}
        items = node.values() if isinstance(node, dict) else node
        return set().union(*(files(item) for item in items))

    listed = files(config["nav"])
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - listed == set(), "docs pages missing from mkdocs.yml: add them to its nav"
    assert listed - pages == set(), "nav entries without a page"


def test_rest_math_and_roles_become_mathjax_and_code() -> None:
    spec = importlib.util.spec_from_file_location(
        "griffe_rest_docstrings", ROOT / "scripts" / "griffe_rest_docstrings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docstring = (
        "Intro, see :class:`~torch.optim.Adam`:\n\n"
        ".. math::\n   a &= b \\\\\n   c &= d\n\n"
        "with :math:`\\beta_2 < 1`.\n\nArgs:\n    x: :func:`ano` value.\n\n"
        "Usage::\n\n    Ano(params)"
    )
    assert module.rest_to_markdown(docstring) == (
        "Intro, see `torch.optim.Adam`:\n\n"
        "\\[\na &= b \\\\\nc &= d\n\\]\n\n"
        "with \\(\\beta_2 < 1\\).\n\nArgs:\n    x: `ano` value.\n\n"
        "Usage:\n\n    Ano(params)"
    )
