"""Packaging: the wheel and the editable install both give ``ano_optimizer.integrations`` and the
entry points, the installed wheel really optimizes, and ``import ano_optimizer`` stays light."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from plugin_fixture import env_with_path, site_packages_without_project

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def run_python(code: str, *, flags=(), paths=(), cwd=None, timeout=180) -> str:
    result = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_with_path(*paths),
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources: building in place would write build/ and
    *.egg-info into the shared checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("ano_optimizer", "integrations"):
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", root / "dist"],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = (root / "dist").glob("ano_optimizer-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("target")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = archive.read(entry_points).decode()
    assert "ano_optimizer/integrations/__init__.py" in names
    for module in (
        "registry/__init__.py",
        "registry/spec.py",
        "keras/__init__.py",
        "keras/optimizers.py",
    ):
        assert f"ano_optimizer/{module}" in names
    assert "ano_optimizer/fused/kernel.cpp" in names  # built at run time by the fused CPU path
    assert "ano_optimizer/py.typed" in names  # PEP 561: type checkers read the annotations
    assert not [n for n in names if n.startswith("integrations/")]
    assert "[ano_optimizer.optimizers]" in entry_text
    assert "ano = ano_optimizer.registry.builtins:ANO" in entry_text
    assert "anolog = ano_optimizer.registry.builtins:ANOLOG" in entry_text
    assert "ano8bit = ano_optimizer.registry.builtins:ANO8BIT" in entry_text
    assert "ano-optimizer = ano_optimizer.cli:main" in entry_text


@pytest.mark.slow
def test_installed_wheel_imports_registers_and_optimizes(installed, tmp_path):
    assert (installed / "ano_optimizer" / "integrations" / "__init__.py").is_file()
    assert not (installed / "integrations").exists()
    site_dir = site_packages_without_project(tmp_path / "site")
    code = """
        import importlib.util, json, sys
        from importlib.metadata import entry_points
        import numpy as np
        import torch
        import ano_optimizer
        import ano_optimizer.integrations
        from ano_optimizer import create_optimizer, get_optimizer_spec, list_optimizers
        from reference import ano_reference

        ours = [e for e in entry_points(group="ano_optimizer.optimizers")
                if e.dist.name == "ano-optimizer"]
        names = list_optimizers()
        errors = {}
        rng = np.random.default_rng(0)
        for name, log in (("ano", False), ("anolog", True)):
            param0 = rng.standard_normal((3, 4))
            grads = rng.standard_normal((6, 3, 4))
            weight = torch.nn.Parameter(torch.tensor(param0))
            optimizer = create_optimizer([weight], name, lr=1e-2, weight_decay=0.1)
            for g in grads:
                weight.grad = torch.tensor(g)
                optimizer.step()
            expected, *_ = ano_reference(
                param0, grads, [True] * 6, lr=1e-2, betas=(0.92, 0.99), eps=1e-8,
                weight_decay=0.1, logarithmic_schedule=log,
            )
            errors[name] = float(np.abs(weight.detach().numpy() - expected[-1]).max())

        # The fused CPU path builds kernel.cpp from the installed package.
        from ano_optimizer import Ano
        from ano_optimizer.fused import native
        fused_p = torch.nn.Parameter(torch.randn(50))
        plain_p = torch.nn.Parameter(fused_p.detach().clone())
        fused_opt, plain_opt = Ano([fused_p], lr=1e-2, fused=True), Ano([plain_p], lr=1e-2)
        for _ in range(3):
            fused_p.grad, plain_p.grad = torch.randn(50), None
            plain_p.grad = fused_p.grad.clone()
            fused_opt.step()
            plain_opt.step()
        print(json.dumps({
            "package": ano_optimizer.__file__,
            "integrations": ano_optimizer.integrations.__file__,
            "top_level_integrations": importlib.util.find_spec("integrations") is not None,
            "entry_points": sorted((e.name, e.value, str(e.dist.locate_file(""))) for e in ours),
            "sources": {n: get_optimizer_spec(n).source for n in names},
            "errors": errors,
            "fused_kernel_built": native.status().loaded,
            "fused_error": float((fused_p - plain_p).abs().max()),
        }))
    """
    # -S and a site-packages mirror without this project: only the installed wheel is visible.
    output = run_python(code, flags=("-S",), paths=(installed, site_dir, TESTS), cwd=tmp_path)
    report = json.loads(output.strip().splitlines()[-1])
    assert report["package"] == str(installed / "ano_optimizer" / "__init__.py")
    assert report["integrations"] == str(
        installed / "ano_optimizer" / "integrations" / "__init__.py"
    )
    assert report["top_level_integrations"] is False
    assert report["entry_points"] == [
        [name, f"ano_optimizer.registry.builtins:{name.upper()}", str(installed)]
        for name in ("ano", "ano8bit", "anolog", "anolog8bit")
    ]
    assert report["sources"]["ano"] == report["sources"]["anolog"] == "built-in"
    for name, error in report["errors"].items():
        assert error < 1e-12, (name, error)
    assert report["fused_kernel_built"] is True
    assert report["fused_error"] < 1e-6


@pytest.mark.slow
def test_editable_install_and_import_stays_light(tmp_path):
    code = """
        import importlib.util, json, sys
        import torch
        import ano_optimizer
        import ano_optimizer.integrations
        from ano_optimizer import create_optimizer, get_optimizer_class, list_optimizers

        for name in list_optimizers(framework="keras") + list_optimizers(framework="optax"):
            ano_optimizer.get_optimizer_spec(name)
        get_optimizer_class("anolog")
        create_optimizer(torch.nn.Linear(2, 2), "ano", weight_decay=0.1)
        heavy = ("tensorflow", "keras", "transformers", "timm", "jax", "optax",
                 "ano_optimizer.keras", "ano_optimizer.optax")
        print(json.dumps({
            "imported": sorted(set(heavy) & set(sys.modules)),
            "integrations": ano_optimizer.integrations.__file__,
            "top_level_integrations": importlib.util.find_spec("integrations") is not None,
        }))
    """
    report = json.loads(run_python(code, cwd=tmp_path).strip().splitlines()[-1])
    assert report["imported"] == []
    # The editable install maps the top-level folder to ano_optimizer.integrations only.
    assert report["integrations"] == str(REPO / "integrations" / "__init__.py")
    assert report["top_level_integrations"] is False
