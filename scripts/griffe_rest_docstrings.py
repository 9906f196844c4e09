"""Griffe extension for the documentation site: render torch-style reST in docstrings.

The optimizers' docstrings follow torch.optim's: Google sections with reST ``.. math::`` blocks
and ``:math:`` / ``:class:`` roles, which read well in ``help()``. Markdown would show them as
raw text, so this rewrites them, when the site is built, into MathJax delimiters for
``pymdownx.arithmatex`` and inline code. Loaded by ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import contextlib
import re
import textwrap

import griffe

with contextlib.suppress(ImportError):
    # The API pages are built by importing every module of the package, ano_optimizer.keras
    # (TensorFlow) and ano_optimizer.fused_triton (Triton) included. Importing triton after
    # tensorflow segfaults on this project's machines; the other order works, so triton first.
    import triton  # noqa: F401

# ".. math::" and the indented lines (and blank lines) that follow it.
_MATH_BLOCK = re.compile(r"^([ \t]*)\.\. math::[ \t]*\n((?:\1[ \t]+\S.*\n|[ \t]*\n)+)", re.M)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_CODE_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
# "text::" before a blank line opens a reST literal block; Markdown's indented code block
# needs only the text, so one colon stays.
_LITERAL_MARKER = re.compile(r"(\S)::[ \t]*\n(?=[ \t]*\n)")


def rest_to_markdown(text: str) -> str:
    def block(match: re.Match) -> str:
        indent, body = match.group(1), textwrap.dedent(match.group(2)).strip("\n")
        return f"{indent}\\[\n{textwrap.indent(body, indent)}\n{indent}\\]\n\n"

    text = _MATH_BLOCK.sub(block, text if text.endswith("\n") else text + "\n").rstrip("\n")
    text = _LITERAL_MARKER.sub(r"\1:\n", text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    return _CODE_ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RestDocstrings(griffe.Extension):
    """Rewrite every docstring once it is loaded, by static analysis or by inspection."""

    def _rewrite(self, obj) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)

    def on_instance(self, *, obj, **kwargs) -> None:
        self._rewrite(obj)
