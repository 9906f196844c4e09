"""Entry-point plugins, with real installed distributions written by ``plugin_fixture``.

The registry reads entry points once per process, so each scenario runs in a fresh subprocess
that reports what it saw as JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plugin_fixture import (
    PLUGIN_DISTRIBUTION,
    PLUGIN_NAME,
    env_with_path,
    signsgd_reference,
    site_packages_without_project,
    write_distribution,
    write_plugin,
)

from ano_optimizer.registry.builtins import BUILTIN_SPECS
from ano_optimizer.registry.plugins import DISABLE_PLUGINS_ENV, plugins_disabled

# The names this project registers itself (the registry lists them sorted).
BUILTIN_NAMES = sorted(spec.name for spec in BUILTIN_SPECS)

REPO = Path(__file__).resolve().parents[1]

# Runs in the subprocess: use the registry, record every warning, print a JSON report.
PROBE = """
import json, sys, warnings
from importlib.metadata import entry_points
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import ano_optimizer
    from ano_optimizer import create_optimizer, get_optimizer_spec, list_optimizers
    # Entry points are read on the first lookup, not on import.
    warnings_at_import = sum("ano_optimizer" in str(w.message) for w in caught)
    names = list_optimizers()
    report = {
        "names": names,
        "torch_names": list_optimizers(framework="torch"),
        "sources": {n: get_optimizer_spec(n).source for n in names},
        "ano_class": get_optimizer_spec("ano").torch_class,
        "module": ano_optimizer.__file__,
        "own_entry_points": sorted(
            e.name
            for e in entry_points(group="ano_optimizer.optimizers")
            if e.dist is not None and e.dist.name == "ano-optimizer"
        ),
    }
    if "signsgd" in names:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2).double()
        param0 = model.weight.detach().clone()
        optimizer = create_optimizer(model, "SignSGD", lr=0.1, weight_decay=0.2, momentum=0.5)
        grads = []
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
            grads.append(model.weight.grad.tolist())
            optimizer.step()
        report["signsgd"] = {
            "class": type(optimizer).__module__ + ":" + type(optimizer).__name__,
            "param0": param0.tolist(),
            "grads": grads,
            "final": model.weight.detach().tolist(),
        }
    list_optimizers()  # a second lookup must not warn again
report["warnings_at_import"] = warnings_at_import
report["warnings"] = [
    (w.category.__name__, str(w.message)) for w in caught if "ano_optimizer" in str(w.message)
]
print(json.dumps(report))
"""


def probe(*paths, python_flags=(), cwd=None, **env) -> dict:
    result = subprocess.run(
        [sys.executable, *python_flags, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=180,
        env=env_with_path(*paths, **env),
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_plugin_optimizer_is_available_by_name(tmp_path):
    report = probe(write_plugin(tmp_path))
    assert report["warnings"] == []
    # The built-ins come through the project's own entry points, as a plugin's do.
    assert report["own_entry_points"] == BUILTIN_NAMES
    assert {"ano", "anolog", PLUGIN_NAME} <= set(report["names"])
    assert PLUGIN_NAME in report["torch_names"]
    assert report["sources"][PLUGIN_NAME] == PLUGIN_DISTRIBUTION
    assert report["sources"]["ano"] == report["sources"]["anolog"] == "built-in"
    run = report["signsgd"]
    assert run["class"] == "ano_fixture_plugin.torch_impl:SignSGD"
    expected = signsgd_reference(
        run["param0"], run["grads"], lr=0.1, momentum=0.5, weight_decay=0.2
    )
    np.testing.assert_allclose(run["final"], expected[-1], rtol=1e-12, atol=1e-15)


@pytest.fixture(scope="module")
def bad_plugins(tmp_path_factory) -> str:
    """One good plugin next to every kind of bad one."""
    directory = tmp_path_factory.mktemp("plugins")
    write_plugin(directory)
    write_plugin(directory, distribution="broken-plugin", name="brokenopt", broken=True)
    write_plugin(directory, distribution="greedy-plugin", name="ano")
    # Two plugins claiming one name: the distribution that sorts first keeps it.
    write_plugin(directory, distribution="zeta-plugin", name="clash")
    write_plugin(directory, distribution="alpha-plugin", name="clash")
    write_distribution(
        directory,
        "malformed-plugin",
        {
            "notaspec": "malformed_plugin:VALUE",
            "missingattr": "malformed_plugin:NOPE",
            "badvalue": "this is not an entry point",
            "othername": "malformed_plugin:SPEC",
        },
        {
            "malformed_plugin/__init__.py": """
                from ano_optimizer import OptimizerSpec
                VALUE = 42
                SPEC = OptimizerSpec("misnamed", "x", "torch.optim:SGD", None)
            """
        },
    )
    return str(directory)


@pytest.mark.slow
def test_bad_plugins_warn_once_each_and_the_rest_keeps_working(bad_plugins):
    report = probe(bad_plugins)
    assert report["warnings_at_import"] == 0
    messages = [message for category, message in report["warnings"]]
    assert {category for category, _ in report["warnings"]} == {"OptimizerPluginWarning"}
    expected = {
        "'brokenopt = broken_plugin:SPEC' of distribution 'broken-plugin': "
        "ModuleNotFoundError: No module named 'broken_plugin_missing_dependency'",
        "'ano = greedy_plugin:SPEC' of distribution 'greedy-plugin': the name 'ano' is "
        "already taken (source: built-in)",
        "'notaspec = malformed_plugin:VALUE' of distribution 'malformed-plugin': it is 42, "
        "not an ano_optimizer.OptimizerSpec",
        "'missingattr = malformed_plugin:NOPE' of distribution 'malformed-plugin': AttributeError:",
        "'badvalue = this is not an entry point' of distribution 'malformed-plugin':",
        "'othername = malformed_plugin:SPEC' of distribution 'malformed-plugin': the entry "
        "point is named 'othername' but its spec is named 'misnamed'",
        "'clash = zeta_plugin:SPEC' of distribution 'zeta-plugin': the name 'clash' is "
        "already taken (source: alpha-plugin)",
    }
    assert len(messages) == len(expected), messages
    for fragment in expected:
        assert sum(fragment in message for message in messages) == 1, (fragment, messages)

    # The built-in kept its name; the good plugin still works next to the broken ones.
    assert report["sources"]["ano"] == "built-in"
    assert report["ano_class"] == "ano_optimizer.optimizer:Ano"
    assert report["sources"][PLUGIN_NAME] == PLUGIN_DISTRIBUTION
    assert not {"brokenopt", "notaspec", "missingattr", "badvalue", "misnamed"} & set(
        report["names"]
    )
    assert report["signsgd"]["class"] == "ano_fixture_plugin.torch_impl:SignSGD"
    assert report["sources"]["clash"] == "alpha-plugin"


@pytest.mark.slow
def test_env_var_disables_plugins(bad_plugins):
    report = probe(bad_plugins, ANO_OPTIMIZER_DISABLE_PLUGINS="1")
    assert report["warnings"] == []
    assert report["names"] == BUILTIN_NAMES
    assert report["sources"] == dict.fromkeys(BUILTIN_NAMES, "built-in")


@pytest.mark.slow
def test_builtins_without_project_metadata(tmp_path):
    """A source checkout that was never installed: no entry points, still ano and anolog."""
    source = tmp_path / "checkout"
    shutil.copytree(REPO / "ano_optimizer", source / "ano_optimizer")
    site_dir = site_packages_without_project(tmp_path / "site")
    # -S: no site-packages, so neither the editable finder nor its .dist-info is seen.
    # cwd elsewhere: "python -c" puts the working directory (the real checkout) on sys.path.
    report = probe(str(source), site_dir, python_flags=("-S",), cwd=tmp_path)
    assert report["module"] == str(source / "ano_optimizer" / "__init__.py")
    assert report["own_entry_points"] == []
    assert report["warnings"] == []
    assert report["names"] == BUILTIN_NAMES
    assert report["sources"] == dict.fromkeys(BUILTIN_NAMES, "built-in")


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("", False)],
)
def test_disable_env_var_values(monkeypatch, value, disabled):
    monkeypatch.setenv(DISABLE_PLUGINS_ENV, value)
    assert plugins_disabled() is disabled


@pytest.mark.slow
def test_a_plugin_that_exits_on_import_costs_one_warning(tmp_path):
    """sys.exit() in a plugin's module once ended the program on its first lookup."""
    directory = tmp_path / "plugins"
    write_plugin(directory)
    write_distribution(
        directory,
        "exiting-plugin",
        {"exitopt": "exiting_plugin:SPEC"},
        {"exiting_plugin/__init__.py": "import sys\nsys.exit('no GPU here')\n"},
    )
    report = probe(directory)
    messages = [message for _, message in report["warnings"]]
    assert len(messages) == 1 and "SystemExit: no GPU here" in messages[0]
    assert {"ano", "anolog", PLUGIN_NAME} <= set(report["names"])
    assert "exitopt" not in report["names"]


_INTERRUPTED = """
import json, sys, warnings
warnings.simplefilter("ignore")
from ano_optimizer import list_optimizers
try:
    list_optimizers()
except KeyboardInterrupt:
    first = "interrupted"
print(json.dumps({"first": first, "second": list_optimizers()}))
"""


@pytest.mark.slow
def test_an_interrupted_discovery_is_retried_on_the_next_lookup(tmp_path):
    """Ctrl-C while a plugin imports: the registry once stayed marked as loaded with whatever
    it had read so far, and later plugins were silently missing."""
    directory = tmp_path / "plugins"
    write_plugin(directory)
    marker = tmp_path / "imported-once"
    write_distribution(
        directory,
        "aaa-slow-plugin",  # sorts first: the interrupt comes before the others are read
        {"slowopt": "aaa_slow_plugin:SPEC"},
        {
            "aaa_slow_plugin/__init__.py": f"""
                import pathlib
                from ano_optimizer import OptimizerSpec
                marker = pathlib.Path({str(marker)!r})
                if not marker.exists():
                    marker.touch()
                    raise KeyboardInterrupt
                SPEC = OptimizerSpec("slowopt", "imported on the second try", "torch.optim:SGD", None)
            """
        },
    )
    out = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED],
        capture_output=True,
        text=True,
        timeout=180,
        env=env_with_path(directory),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["first"] == "interrupted"
    assert {"ano", "anolog", "slowopt", PLUGIN_NAME} <= set(report["second"])


@pytest.mark.slow
def test_builtins_are_known_by_their_objects_not_by_a_distribution_name(tmp_path):
    """A distribution whose name normalises to this project's ("Ano.Optimizer") once replaced
    the built-in 'ano', reported as built-in. The built-ins are their spec objects: any other
    spec claiming a built-in name is refused with a warning, and an entry point resolving to one
    of them (a stale copy of this project's metadata) is the built-in itself. (importlib keeps
    one distribution per normalised name, so each case gets its own directory, and runs outside
    the checkout, whose egg-info would be found first.)"""
    impostor = tmp_path / "impostor"
    write_distribution(
        impostor,
        "Ano.Optimizer",
        {"ano": "impostor_plugin:SPEC"},
        {
            "impostor_plugin/__init__.py": """
                from ano_optimizer import OptimizerSpec
                SPEC = OptimizerSpec("ano", "not the real Ano", "torch.optim:SGD", None)
            """
        },
    )
    report = probe(impostor, cwd=tmp_path)
    assert report["sources"]["ano"] == "built-in"
    assert report["ano_class"] == "ano_optimizer.optimizer:Ano"
    (message,) = [message for _, message in report["warnings"]]
    assert "'ano = impostor_plugin:SPEC' of distribution 'Ano.Optimizer'" in message
    assert "the name 'ano' is already taken (source: built-in)" in message

    stale = tmp_path / "stale"
    write_distribution(stale, "ano_optimizer", {"anolog": "ano_optimizer.registry.builtins:ANOLOG"})
    report = probe(stale, cwd=tmp_path)
    assert report["own_entry_points"] == [] and report["warnings"] == []
    assert report["names"] == BUILTIN_NAMES
    assert report["sources"] == dict.fromkeys(BUILTIN_NAMES, "built-in")


@pytest.mark.slow
def test_descriptions_with_control_characters_are_refused(tmp_path):
    directory = tmp_path / "plugins"
    write_plugin(directory)
    write_distribution(
        directory,
        "escape-plugin",
        {"escapeopt": "escape_plugin:SPEC"},
        {
            "escape_plugin/__init__.py": """
                from ano_optimizer import OptimizerSpec
                SPEC = OptimizerSpec(
                    "escapeopt", "looks fine\\r\\x1b[31mTOTALLY SAFE", "torch.optim:SGD", None
                )
            """
        },
    )
    report = probe(directory)
    assert "escapeopt" not in report["names"] and PLUGIN_NAME in report["names"]
    (message,) = [message for _, message in report["warnings"]]
    assert "printable" in message and "\x1b" not in message and "\r" not in message


def test_the_1_1_0_import_path_of_the_plugin_warning_still_works():
    import importlib
    import sys

    import ano_optimizer

    sys.modules.pop("ano_optimizer.plugins", None)
    with pytest.warns(DeprecationWarning, match="ano_optimizer.plugins is deprecated"):
        old = importlib.import_module("ano_optimizer.plugins")
    assert old.OptimizerPluginWarning is ano_optimizer.OptimizerPluginWarning
