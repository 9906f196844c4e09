"""Report what ano-optimizer finds on this machine, for bug reports and "why is my name unknown?".

Versions of Python, torch and every framework ano-optimizer works with; which integrations
register here and the names they expose; whether the fused CPU kernel builds (compiler, cache
directory, and why not); which optimizer plugins loaded and which failed. Keras is checked in a
subprocess: TensorFlow must not share a process with torch.compile's triton.

examples:
  ano-optimizer env
  ano-optimizer env --json > env.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import warnings

# import name -> the distributions that provide it (the first one installed is reported)
FRAMEWORKS = {
    "transformers": ("transformers",),
    "accelerate": ("accelerate",),
    "timm": ("timm",),
    "torchvision": ("torchvision",),
    "deepspeed": ("deepspeed",),
    "lightning": ("lightning",),
    "stable_baselines3": ("stable-baselines3",),
    "gymnasium": ("gymnasium",),
    "keras": ("keras",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "jax": ("jax",),
    "optax": ("optax",),
    "triton": ("triton", "pytorch-triton"),
}
# where ano_optimizer is imported from: the parent of this cli/ folder
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KERAS_TIMEOUT_S = 180
_KERAS_PROBE = """
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
from ano_optimizer.integrations import register_framework
print(json.dumps({"names": register_framework("keras"), "backend": keras.backend.backend()}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that fails, or a module with no spec
        return False


def _version(name: str) -> str | None:
    """The installed version of import name ``name``; None when it cannot be imported."""
    if not _findable(name):
        return None
    for distribution in FRAMEWORKS.get(name, (name,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown version"


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _torch_integrations(report: dict) -> None:
    from ..integrations import TORCH_FRAMEWORKS, register_framework

    for framework in TORCH_FRAMEWORKS:
        entry = {"status": "not installed", "names": [], "error": None}
        if report["frameworks"].get(framework) is not None:
            try:
                entry["names"] = sorted(register_framework(framework))
                entry["status"] = "registered"
            except Exception as error:  # what register_all would warn about
                entry["status"], entry["error"] = "failed", _error_text(error)
        report["integrations"][framework] = entry


def _keras_integration(report: dict) -> None:
    entry = {"status": "not installed", "names": [], "error": None}
    if report["frameworks"].get("keras") is not None:
        try:
            done = subprocess.run(
                [sys.executable, "-c", _KERAS_PROBE],
                capture_output=True,
                text=True,
                timeout=_KERAS_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            entry["status"] = "failed"
            entry["error"] = f"the Keras check did not finish in {_KERAS_TIMEOUT_S} s"
        else:
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                found = json.loads(lines[-1])
                entry.update(status="registered", names=sorted(found["names"]))
                entry["backend"] = found["backend"]
            else:
                problem = [line for line in done.stderr.strip().splitlines() if line.strip()]
                entry["status"] = "failed"
                entry["error"] = problem[-1] if problem else f"exit status {done.returncode}"
    report["integrations"]["keras"] = entry


def _optax_integration(report: dict) -> None:
    from ..registry import list_optimizers

    entry = {"status": "not installed", "names": [], "error": None}
    if report["frameworks"].get("optax") is not None:
        try:
            import ano_optimizer.optax  # noqa: F401 - the check is that it imports
        except Exception as error:
            entry["status"], entry["error"] = "failed", _error_text(error)
        else:
            entry["status"] = "available"
            entry["names"] = list_optimizers(framework="optax")
    report["integrations"]["optax"] = entry


def _fused_kernel(report: dict) -> None:
    from ..fused import native

    print("checking the fused CPU kernel (a first build compiles it)...", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is in the report
        status = native.load()
    report["fused_cpu_kernel"] = {
        "builds": status.loaded,
        "reason": status.reason,
        "library": str(status.library) if status.library else None,
        **native.toolchain(),
    }


def _plugins(report: dict) -> None:
    from ..registry.plugins import DISABLE_PLUGINS_ENV, load_into, plugins_disabled

    specs: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_into(specs)
    report["plugins"] = {
        "disabled": plugins_disabled(),
        "disable_variable": DISABLE_PLUGINS_ENV,
        "loaded": [
            {"name": spec.name, "distribution": spec.source}
            for spec in specs.values()
            if spec.source != "built-in"
        ],
        "failed": [str(w.message) for w in caught],
    }


def collect() -> dict:
    """The whole report, as ``--json`` prints it."""
    import torch

    from .. import __version__

    report = {
        "ano_optimizer": {"version": __version__, "location": _PACKAGE_DIR},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda_version": torch.version.cuda,
            "threads": torch.get_num_threads(),
        },
        "frameworks": {name: _version(name) for name in FRAMEWORKS},
        "integrations": {},
    }
    _plugins(report)
    _torch_integrations(report)
    _keras_integration(report)
    _optax_integration(report)
    _fused_kernel(report)
    return report


def render(report: dict) -> str:
    """The report as text, one fact per line."""
    torch_info = report["torch"]
    cuda = f"CUDA {torch_info['cuda_version']}" if torch_info["cuda_available"] else "no CUDA"
    lines = [
        f"ano-optimizer {report['ano_optimizer']['version']} "
        f"({report['ano_optimizer']['location']})",
        f"Python {report['python']['version']} ({report['python']['executable']})",
        f"platform {report['platform']}",
        f"torch {torch_info['version']} ({cuda}, {torch_info['threads']} threads)",
        "",
        "frameworks:",
    ]
    width = max(map(len, report["frameworks"]))
    for name, version in report["frameworks"].items():
        lines.append(f"  {name.ljust(width)}  {version or 'not installed'}")
    lines += ["", "integrations (registry names usable in each framework):"]
    for name, entry in report["integrations"].items():
        detail = {
            "registered": ", ".join(entry["names"]) or "(no names)",
            "available": "get_optimizer_class(NAME, 'optax'): " + ", ".join(entry["names"]),
            "not installed": "-",
            "failed": entry["error"],
        }[entry["status"]]
        backend = f" [backend {entry['backend']}]" if entry.get("backend") else ""
        lines.append(f"  {name.ljust(12)}  {entry['status']}{backend}: {detail}")
    kernel = report["fused_cpu_kernel"]
    lines += [
        "",
        "fused CPU kernel: " + ("builds" if kernel["builds"] else f"not built: {kernel['reason']}"),
        f"  compiler   {kernel['compiler'] or 'unknown'}",
        f"  ninja      {kernel['ninja'] or 'not found (pip install ninja)'}",
        f"  cache dir  {kernel['cache_dir'] or 'unknown'}",
        f"  CPU        {kernel['cpu_vector_isa']}",
        "",
    ]
    plugins = report["plugins"]
    if plugins["disabled"]:
        lines.append(f"plugins: disabled ({plugins['disable_variable']} is set)")
    else:
        loaded = ", ".join(f"{p['name']} ({p['distribution']})" for p in plugins["loaded"])
        lines.append(f"plugins loaded: {loaded or 'none'}")
        lines.append(f"plugins failed: {len(plugins['failed']) or 'none'}")
        lines += [f"  {message}" for message in plugins["failed"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
