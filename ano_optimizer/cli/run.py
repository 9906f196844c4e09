"""Run a training script as ``python SCRIPT ARGS...`` would, after registering every integration.

Registry names then work in an unchanged script, e.g. with Hugging Face ``HfArgumentParser``:

    ano-optimizer run train.py --optim anolog --optim_args "eps=1e-7" --output_dir out

The script runs in this process as ``__main__``, with ``sys.argv`` set to ``[SCRIPT, ARGS...]``
and ``sys.path[0]`` to the script's directory; its exit status is this command's.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import zipfile


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the arguments after ``run`` into this command's own (up to the script) and the
    script's, which are handed over verbatim: argparse would drop a ``--`` that python keeps."""
    for index, token in enumerate(argv):
        if token == "--":  # "run -- SCRIPT": the script name itself starts with "-"
            return argv[: index + 2], argv[index + 2 :]
        if not token.startswith("-"):
            return argv[: index + 1], argv[index + 1 :]
    return argv, []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "script", help="the Python script to run (or a directory or zip file with __main__.py)"
    )
    parser.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="arguments handed to the script unchanged, '--' included",
    )


def run(args: argparse.Namespace) -> int:
    script = args.script
    if not os.path.exists(script):
        # The same message and status as ``python missing.py``.
        print(
            f"ano-optimizer run: can't open file {os.path.abspath(script)!r}: "
            "[Errno 2] No such file or directory",
            file=sys.stderr,
        )
        return 2

    from ..integrations import register_all

    register_all()

    sys.argv = [script, *args.script_args]
    if os.path.isdir(script) or zipfile.is_zipfile(script):
        # runpy puts a directory or zip archive on sys.path itself, as python does.
        del sys.path[0]
    else:
        # python resolves symbolic links for sys.path[0]; run_path leaves sys.path alone for a file.
        sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")
    return 0
