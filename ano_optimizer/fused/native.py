"""The C++ kernel of ``ano::fused_step_`` on the CPU (``kernel.cpp``): built with
``torch.utils.cpp_extension`` the first time a process needs it on a machine, then loaded from
the cache.

The build targets the machine it runs on (``-march=native``: AVX-512, AVX2 or NEON from the
same source) and takes tens of seconds, once per machine, torch release and kernel source; a line
on stderr says so while it runs. Later processes load the built library directly (no compiler, no
ninja). Where it cannot be built (no C++ compiler, no ninja, a failed build), one warning says
why, and the CPU runs the operator's torch implementation instead (:mod:`.torch_step`: the same
results, several times slower).

The cache is ``$TORCH_EXTENSIONS_DIR`` (default ``torch.utils.cpp_extension``'s,
``~/.cache/torch_extensions``), in a folder named by a hash of what the build depends on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import op

__all__ = [
    "BUILD_FLAGS",
    "EXTRA_CFLAGS_ENV",
    "BuildError",
    "KernelStatus",
    "build_flags",
    "build_folder",
    "cpu_vector_isa",
    "kernel_source",
    "load",
    "load_library",
    "status",
    "toolchain",
]

# -ffp-contract=off: no fused multiply-adds, so every operation rounds as torch_step.py's does.
# -fno-math-errno: sqrt is the instruction, which vectorizes. Hidden inline symbols: the
# library's copies of ATen's inline functions stay its own, built with these flags.
BUILD_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
)
_LINK_FLAGS = ("-fopenmp",)
# Extra compiler flags for the build, e.g. "-mno-avx512f" to build, on an AVX-512 machine, the
# code an AVX2 machine runs (benchmarks/fused_step.py measures both).
EXTRA_CFLAGS_ENV = "ANO_OPTIMIZER_KERNEL_CFLAGS"


def build_flags() -> list[str]:
    """The compiler flags of a build: :data:`BUILD_FLAGS` and ``$ANO_OPTIMIZER_KERNEL_CFLAGS``."""
    return [*BUILD_FLAGS, *os.environ.get(EXTRA_CFLAGS_ENV, "").split()]


@dataclass(frozen=True)
class KernelStatus:
    """Whether the CPU kernel is loaded in this process; its library, or why not."""

    loaded: bool
    library: Path | None
    reason: str | None


def kernel_source() -> str:
    return (resources.files("ano_optimizer.fused") / "kernel.cpp").read_text()


def build_folder(name: str = "ano_fused", source: str | None = None) -> Path:
    """Where a library named ``name`` built from ``source`` (the kernel's by default) for this
    machine, torch, Python and flags is built and cached."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "torch_extensions"
    )
    key = "\n".join(
        [
            kernel_source() if source is None else source,
            " ".join([*build_flags(), *_LINK_FLAGS]),
            torch.__version__,
            sys.version,
            platform.machine(),
            os.environ.get("CXX", ""),
        ]
    )
    return Path(root) / f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_library(name: str, source: str, what: str) -> Path:
    """Load the C++ library ``name`` built from the text ``source``, building it first where
    the cache lacks it (saying so on stderr: ``what`` names it); return its path. Its
    ``TORCH_LIBRARY`` registrations take effect on load. Raises where it cannot be built."""
    folder = build_folder(name, source)
    library = folder / f"{folder.name}.so"
    done = folder / "built"
    if done.exists() and library.exists():
        torch.ops.load_library(str(library))
    else:
        _build(folder, source, what)
        done.touch()
    return library


_STATUS: KernelStatus | None = None


def status() -> KernelStatus:
    """This process's kernel status, without building anything."""
    return _STATUS or KernelStatus(False, None, "not loaded yet in this process")


@functools.cache
def load() -> KernelStatus:
    """Load the kernel (building it first where the cache lacks it) and register it as
    ``ano::fused_step_``'s CPU implementation; once per process. Warns where it cannot."""
    global _STATUS
    assert op.LIBRARY is not None  # the operator exists before its kernel registers
    try:
        library = load_library("ano_fused", kernel_source(), "the fused CPU kernel")
        _STATUS = KernelStatus(True, library, None)
    except Exception as error:  # no compiler, no ninja, a failed build or load
        reason = _reason(error)
        _STATUS = KernelStatus(False, None, reason)
        warnings.warn(
            f"Ano fused=True: the C++ CPU kernel could not be built ({reason}); CPU tensors "
            "take the operator's torch implementation (ano_optimizer.fused.torch_step), with "
            "the same results, several times slower. `ano-optimizer env` shows the compiler.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _STATUS


class BuildError(RuntimeError):
    """Why the kernel cannot be built here, in a sentence."""


def _reason(error: Exception) -> str:
    if isinstance(error, BuildError):
        return str(error)
    # A compiler's output: the first line that says error, else the message's last line.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    detail = (errors or lines or [""])[0 if errors else -1]
    return f"{type(error).__name__}: {detail[:300]}"


def _build(folder: Path, text: str, what: str) -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} is not found (set CXX to one)")
    if shutil.which("ninja") is None and _ninja_module() is None:
        raise BuildError("ninja is not found (pip install ninja)")
    # Imported here: torch.utils.cpp_extension is slow to import, and needed only to build.
    from torch.utils.cpp_extension import load as load_extension

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "source.cpp"
    if not source.exists() or source.read_text() != text:
        source.write_text(text)
    print(
        f"Ano: building {what} for this machine (once; about a minute at most), cached in {folder}",
        file=sys.stderr,
        flush=True,
    )
    path = os.environ.get("PATH", "")
    ninja = _ninja_module()
    if shutil.which("ninja") is None and ninja is not None:
        # The ninja package's binary, where its scripts folder is not on PATH (a venv that was
        # not activated): cpp_extension looks for ninja on PATH.
        os.environ["PATH"] = str(Path(ninja).parent) + os.pathsep + path
    try:
        load_extension(
            folder.name,
            [str(source)],
            extra_cflags=build_flags(),
            extra_ldflags=list(_LINK_FLAGS),
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def toolchain() -> dict[str, str | None]:
    """What a build would use, for ``ano-optimizer env``: the C++ compiler (``$CXX``, else
    ``c++``), ninja, the cache folder, and the vector instructions this CPU has."""
    compiler = os.environ.get("CXX", "c++")
    return {
        "compiler": shutil.which(compiler) or f"{compiler} (not found)",
        "ninja": shutil.which("ninja") or _ninja_module(),
        "cache_dir": str(build_folder()),
        "cpu_vector_isa": cpu_vector_isa(),
    }


def _ninja_module() -> str | None:
    try:
        import ninja  # the PyPI package bundles the binary
    except ImportError:
        return None
    return str(Path(ninja.BIN_DIR) / "ninja")


def cpu_vector_isa() -> str:
    """The widest vector instruction sets of this CPU that the kernel's build uses (less what
    ``$ANO_OPTIMIZER_KERNEL_CFLAGS`` turns off with ``-mno-...``)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "NEON"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return f"unknown ({machine})"
    # What the build leaves out (-mno-avx512f: the code an AVX2 machine runs).
    flags -= {flag.removeprefix("-mno-") for flag in build_flags() if flag.startswith("-mno-")}
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    if avx512 <= flags:
        return "AVX-512 (F, BW, DQ, VL)"
    if "avx2" in flags:
        return "AVX2" + (" + FMA" if "fma" in flags else "")
    return "SSE (no AVX2)"
