"""The ``ano-optimizer`` command line.

Each subcommand lives in its own module of this package (``list``: :mod:`.listing`, ``demo``:
:mod:`ano_optimizer.demo`, ``run``: :mod:`.run`, ``env``: :mod:`.env`), imported only when that
subcommand runs, so ``ano-optimizer --help`` stays fast and ``import ano_optimizer`` stays light. A subcommand module
defines ``add_arguments(parser)`` and ``run(args) -> int``; one that hands arguments on to another
program also defines ``split_argv(argv) -> (own, passed_on)``, and ``passed_on`` reaches
``run`` untouched by argparse as ``args.script_args``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "list": (
        "ano_optimizer.cli.listing",
        "list every registered optimizer, its frameworks and origin",
    ),
    "demo": (
        "ano_optimizer.demo",
        "the fair study: tuned learning rates on gradient noise, label noise and RL",
    ),
    "run": (
        "ano_optimizer.cli.run",
        "run a training script (python SCRIPT ARGS...) after registering every integration",
    ),
    "env": (
        "ano_optimizer.cli.env",
        "report versions, integrations, the fused kernel build and plugins (for bug reports)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module (if any) is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="ano-optimizer",
        description="Ano and Anolog optimizers: registry listing, the noise-study demo, and a "
        "launcher that makes registry names usable in unchanged training scripts. "
        "Run 'ano-optimizer COMMAND --help' for a command's options.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        if name == command:
            # A broken or slow subcommand module cannot affect the others.
            module = importlib.import_module(module_name)
            sub_parser.description = module.__doc__
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    passed_on = None
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        if hasattr(module, "split_argv"):
            position = argv.index(command) + 1
            own, passed_on = module.split_argv(argv[position:])
            argv = argv[:position] + own
    args = parser.parse_args(argv)
    if passed_on is not None:
        args.script_args = passed_on
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._module.run(args) or 0)
