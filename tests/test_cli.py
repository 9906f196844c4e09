"""The real ``ano-optimizer`` console script: ``--help`` and ``list``."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_fixture import PLUGIN_DISTRIBUTION, env_with_path, write_distribution, write_plugin

from ano_optimizer.cli import SUBCOMMANDS, main

SCRIPT = Path(sys.executable).with_name("ano-optimizer")


def ano_optimizer(*args, env=None, cwd=None):
    command = str(SCRIPT) if SCRIPT.exists() else shutil.which("ano-optimizer")
    assert command, "the ano-optimizer console script is not installed (pip install -e .)"
    return subprocess.run(
        [command, *args], capture_output=True, text=True, timeout=180, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("plugins")
    write_plugin(directory)
    # A plugin whose Keras module is missing: listed, with keras marked not importable.
    write_distribution(
        directory,
        "half-plugin",
        {"halfopt": "half_plugin:SPEC"},
        {
            "half_plugin/__init__.py": """
                from ano_optimizer import OptimizerSpec
                SPEC = OptimizerSpec(
                    "halfopt", "torch only in practice", "torch.optim:SGD",
                    "half_plugin.not_written:SGD", has_betas=False, has_eps=False,
                )
            """
        },
    )
    return str(directory)


def test_help_explains_every_subcommand(capsys):
    result = ano_optimizer("--help")
    assert result.returncode == 0, result.stderr
    for name, (_module, help_text) in SUBCOMMANDS.items():
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert help_text.split()[0] in line
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("pattern", "--framework", "--json", "examples:"):
        assert option in out


# Imported by Python at start-up when on sys.path: records the modules loaded when it exits.
SITECUSTOMIZE = """
import atexit, os, sys
atexit.register(
    lambda: open(os.environ["ANO_TEST_MODULES_FILE"], "w").write("\\n".join(sorted(sys.modules)))
)
"""


def test_list_table_with_plugins_and_no_keras_import(plugins, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    modules_file = tmp_path / "modules.txt"
    env = env_with_path(tmp_path, plugins, ANO_TEST_MODULES_FILE=modules_file)
    result = ano_optimizer("list", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    imported = set(modules_file.read_text().split())
    assert "ano_optimizer.cli.listing" in imported
    assert not {"keras", "tensorflow", "ano_optimizer.keras"} & imported

    lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["NAME", "FRAMEWORKS", "SOURCE", "DESCRIPTION"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}
    frameworks = ", ".join(
        name if importlib.util.find_spec(name) else f"{name} (not importable)"
        for name in ("torch", "keras", "optax")
    )
    assert rows["ano"][:2] == [frameworks, "built-in"]
    assert rows["ano"][2].startswith("Ano: sign-of-momentum direction")
    assert rows["anolog"][:2] == [frameworks, "built-in"]
    assert rows["anolog"][2].startswith("Anolog: Ano with the logarithmic momentum schedule")
    assert rows["signsgd"] == [
        frameworks,
        PLUGIN_DISTRIBUTION,
        f"SignSGD with momentum (test plugin {PLUGIN_DISTRIBUTION})",
    ]
    assert rows["halfopt"] == [
        "torch, keras (not importable)",
        "half-plugin",
        "torch only in practice",
    ]


def test_list_json_pattern_and_framework(plugins, tmp_path):
    result = ano_optimizer(
        "list", "SIGN*", "--framework", "torch", "--json", env=env_with_path(plugins), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["name"] == "signsgd"
    assert row["source"] == PLUGIN_DISTRIBUTION
    assert row["frameworks"]["torch"] == {
        "class": "ano_fixture_plugin.torch_impl:SignSGD",
        "available": True,
    }
    assert row["frameworks"]["keras"]["class"] == "ano_fixture_plugin.keras_impl:SignSGD"
    assert row["frameworks"]["optax"]["class"] == "ano_fixture_plugin.optax_impl:signsgd"
    assert (row["has_betas"], row["has_eps"], row["has_momentum"]) == (False, False, True)


def test_list_optax_framework(capsys):
    assert main(["list", "ano*", "--framework", "optax", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"ano", "anolog"} <= set(rows)
    assert rows["ano"]["frameworks"]["optax"] == {
        "class": "ano_optimizer.optax:ano",
        "available": importlib.util.find_spec("optax") is not None,
    }


def test_list_reports_no_match_and_bad_framework(capsys):
    assert main(["list", "zz*"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no optimizer matches pattern 'zz*'; known: " in captured.err
    assert main(["list", "zz*", "--json", "--framework", "keras"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "pattern 'zz*' and framework 'keras'" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--framework", "jax"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'jax'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("error", ["ImportError('libfoo.so: cannot open')", "AttributeError('x')"])
def test_run_warns_once_for_a_framework_that_fails_to_import(tmp_path, error):
    """A broken timm (any exception on import) costs one warning naming it; the script runs."""
    shadow = tmp_path / "shadow"
    (shadow / "timm").mkdir(parents=True)
    (shadow / "timm" / "__init__.py").write_text(f"raise {error}\n")
    script = tmp_path / "train.py"
    script.write_text("import sys\nprint('script ran', sys.argv[1:])\n")
    result = ano_optimizer(
        "run", str(script), "--", "--lr", "1", env=env_with_path(shadow), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "script ran ['--', '--lr', '1']"
    warnings = [
        line for line in result.stderr.splitlines() if "integration is not registered" in line
    ]
    assert len(warnings) == 1, result.stderr
    assert "the timm integration" in warnings[0] and error.split("(")[0] in warnings[0]


# ------------------------------------------------------------------------------ ano-optimizer env


# Imported at start-up from a directory on PYTHONPATH: Keras cannot be found.
HIDE_KERAS = "import sys\nsys.modules['keras'] = None\n"


def _env_report(*paths, cwd, **variables) -> dict:
    result = ano_optimizer("env", "--json", env=env_with_path(*paths, **variables), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_env_reports_versions_integrations_kernel_and_plugins(tmp_path):
    from importlib.metadata import version

    import torch

    plugins = tmp_path / "plugins"
    write_plugin(plugins)
    write_plugin(plugins, distribution="broken-plugin", name="brokenopt", broken=True)
    report = _env_report(plugins, cwd=tmp_path)

    assert report["torch"]["version"] == torch.__version__
    for name, distribution in [("transformers", "transformers"), ("timm", "timm"),
                               ("lightning", "lightning"), ("optax", "optax")]:  # fmt: skip
        assert report["frameworks"][name] == version(distribution)
    integrations = report["integrations"]
    for framework in ("transformers", "timm", "keras"):
        assert integrations[framework]["status"] == "registered", integrations[framework]
        assert {"ano", "anolog", "signsgd"} <= set(integrations[framework]["names"])
    assert integrations["keras"]["backend"] in ("tensorflow", "jax", "torch")
    assert integrations["optax"]["status"] == "available"
    assert {"ano", "anolog", "signsgd"} <= set(integrations["optax"]["names"])

    kernel = report["fused_cpu_kernel"]
    assert kernel["builds"] is True and kernel["reason"] is None
    assert kernel["compiler"] and kernel["cache_dir"]

    assert report["plugins"]["loaded"] == [{"name": "signsgd", "distribution": PLUGIN_DISTRIBUTION}]
    [failure] = report["plugins"]["failed"]
    assert "'brokenopt = broken_plugin:SPEC' of distribution 'broken-plugin'" in failure
    assert "ModuleNotFoundError" in failure


@pytest.mark.slow
def test_env_without_timm_and_with_a_broken_timm(tmp_path):
    """Where timm is absent, env says so; where importing it raises, env names the error.
    Either way the other integrations still register and env exits 0. (Keras is hidden too:
    its check imports TensorFlow, and the other test covers it.)"""
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(HIDE_KERAS + "sys.modules['timm'] = None\n")
    report = _env_report(absent, cwd=tmp_path, ANO_OPTIMIZER_DISABLE_PLUGINS="1")
    assert report["frameworks"]["timm"] is None
    assert report["integrations"]["timm"] == {"status": "not installed", "names": [], "error": None}
    assert report["integrations"]["transformers"]["status"] == "registered"
    assert report["integrations"]["keras"]["status"] == "not installed"
    assert report["plugins"]["disabled"] is True and report["plugins"]["loaded"] == []

    broken = tmp_path / "broken"
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text("raise ImportError('libtimm.so: missing')\n")
    (broken / "sitecustomize.py").write_text(HIDE_KERAS)
    report = _env_report(broken, cwd=tmp_path)
    assert report["integrations"]["timm"]["status"] == "failed"
    assert report["integrations"]["timm"]["error"] == "ImportError: libtimm.so: missing"
    assert report["integrations"]["transformers"]["status"] == "registered"


@pytest.mark.slow
def test_env_text_names_why_the_fused_kernel_does_not_build(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE_KERAS)
    result = ano_optimizer(
        "env",
        env=env_with_path(
            tmp_path,
            CXX=str(tmp_path / "no-such-compiler"),
            TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"),
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    kernel = next(line for line in lines if line.startswith("fused CPU kernel:"))
    assert kernel.startswith("fused CPU kernel: not built: no C++ compiler")
    assert str(tmp_path / "no-such-compiler") in kernel
    assert f"cache dir  {tmp_path / 'cache'}" in result.stdout
    assert re.search(r"^  timm +\d", result.stdout, re.MULTILINE)
    assert re.search(r"^  timm +registered: .*\banolog\b", result.stdout, re.MULTILINE)
