"""List every registered optimizer: name, frameworks available here, origin, description.

A framework counts as available when both the framework and the optimizer's module can be
found by the import system; nothing is imported to check (Keras in particular stays unloaded).

examples:
  ano-optimizer list
  ano-optimizer list 'ano*' --framework keras
  ano-optimizer list --json
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys

from ..registry import FRAMEWORKS, OptimizerSpec, get_optimizer_spec, list_optimizers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pattern",
        nargs="?",
        default=None,
        help="shell-style wildcard on names, case-insensitive (e.g. 'ano*'); default: all",
    )
    parser.add_argument(
        "--framework",
        choices=FRAMEWORKS,
        default=None,
        help="only optimizers that have a class for this framework",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _findable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it or its parent packages (a
    package's ``__init__`` may import its framework, as ``ano_optimizer.keras`` imports Keras)."""
    parts = module.split(".")
    path = None
    try:
        for depth in range(len(parts)):
            name = ".".join(parts[: depth + 1])
            loaded = sys.modules.get(name)
            if loaded is not None:
                spec = getattr(loaded, "__spec__", None)
            elif depth == 0:
                spec = importlib.util.find_spec(name)
            else:
                spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None:
                return False
            path = spec.submodule_search_locations
            if path is None and depth < len(parts) - 1:
                return False  # a module, not a package, cannot hold the rest of the name
    except (ImportError, ValueError):
        return False
    return True


def _frameworks(spec: OptimizerSpec) -> dict[str, dict]:
    found = {}
    for framework in spec.frameworks:
        reference = spec.class_reference(framework)
        module = reference.partition(":")[0]
        found[framework] = {
            "class": reference,
            "available": _findable(framework) and _findable(module),
        }
    return found


def _row(spec: OptimizerSpec) -> dict:
    return {
        "name": spec.name,
        "description": spec.description,
        "source": spec.source,
        "frameworks": _frameworks(spec),
        "defaults": dict(spec.defaults),
        "has_betas": spec.has_betas,
        "has_eps": spec.has_eps,
        "has_momentum": spec.has_momentum,
    }


def _table(rows: list[dict]) -> str:
    def frameworks(row: dict) -> str:
        return ", ".join(
            name if info["available"] else f"{name} (not importable)"
            for name, info in row["frameworks"].items()
        )

    cells = [("NAME", "FRAMEWORKS", "SOURCE", "DESCRIPTION")] + [
        (row["name"], frameworks(row), row["source"], row["description"]) for row in rows
    ]
    widths = [max(len(cell[i]) for cell in cells) for i in range(3)]
    return "\n".join(
        "  ".join(cell[i].ljust(widths[i]) for i in range(3)) + "  " + cell[3] for cell in cells
    )


def run(args: argparse.Namespace) -> int:
    names = list_optimizers(args.pattern, framework=args.framework)
    rows = [_row(get_optimizer_spec(name)) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
    elif rows:
        print(_table(rows))
    if not rows:
        filters = []
        if args.pattern is not None:
            filters.append(f"pattern {args.pattern!r}")
        if args.framework is not None:
            filters.append(f"framework {args.framework!r}")
        print(
            f"no optimizer matches {' and '.join(filters)}; known: {', '.join(list_optimizers())}",
            file=sys.stderr,
        )
        return 1
    return 0
