"""Write small but real optimizer plugin distributions, for tests of every framework integration.

:func:`write_plugin` writes an installed distribution (a ``.dist-info`` with ``METADATA`` and
``entry_points.txt``) and its package into a directory; put that directory on ``PYTHONPATH``
(or ``sys.path``, before ``ano_optimizer``'s registry is first used) and the plugin's optimizer
is available by name. Use it in a subprocess (see :func:`env_with_path`): the registry reads the
entry points once per process.

The plugin is SignSGD with momentum, deliberately unlike Ano: it takes ``momentum`` but neither
``betas`` nor ``eps`` (``has_betas=False, has_eps=False, has_momentum=True``), so an integration
that forwards Ano's arguments to every optimizer fails on it. Its update, per tensor::

    buf = momentum * buf + grad          (buf starts at 0)
    p   = p * (1 - lr * weight_decay)
    p   = p - lr * sign(buf)

:func:`signsgd_reference` computes it in float64. The torch class is
``<module>.torch_impl:SignSGD`` (``SignSGD(params, lr=1e-3, momentum=0.0, weight_decay=0.0)``)
the Keras class ``<module>.keras_impl:SignSGD`` (``SignSGD(learning_rate=1e-3,
momentum=0.0, weight_decay=None, ...)``, imported only when asked for) and the optax factory
``<module>.optax_impl:signsgd`` (``signsgd(learning_rate=1e-3, momentum=0.0, weight_decay=0.0)``).
"""

from __future__ import annotations

import os
import site
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PLUGIN_DISTRIBUTION = "ano-fixture-plugin"
PLUGIN_NAME = "signsgd"
ENTRY_POINT_GROUP = "ano_optimizer.optimizers"

_TORCH_IMPL = '''
"""SignSGD with momentum for PyTorch."""

import torch


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0):
        if not 0.0 <= lr:
            raise ValueError(f"SignSGD: invalid lr={lr!r}; it must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SignSGD: invalid momentum={momentum!r}; it must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"SignSGD: invalid weight_decay={weight_decay!r}; it must be >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(buf), alpha=-group["lr"])
        return loss
'''

_KERAS_IMPL = '''
"""SignSGD with momentum for Keras 3."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ano_fixture_plugin")
class SignSGD(keras.optimizers.Optimizer):
    def __init__(self, learning_rate=1e-3, momentum=0.0, weight_decay=None, name="signsgd", **kwargs):
        # **kwargs: Keras' own base options (clipnorm, ema, ...), checked by the base class.
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SignSGD: invalid momentum={momentum!r}; it must be in [0, 1)")
        self.momentum = momentum

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [
            self.add_variable_from_reference(v, name="momentum") for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, ops.add(ops.multiply(buf, self.momentum), gradient))
        self.assign_sub(variable, ops.multiply(learning_rate, ops.sign(buf)))

    def get_config(self):
        config = super().get_config()
        config["momentum"] = self.momentum
        return config
'''

_OPTAX_IMPL = '''
"""SignSGD with momentum for optax, as a chain of optax's own transforms."""

import jax
import jax.numpy as jnp
import optax


def _sign_of_trace(momentum):
    def init_fn(params):
        return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        trace = jax.tree.map(lambda g, t: momentum * t + g, updates, state.trace)
        return jax.tree.map(jnp.sign, trace), optax.TraceState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


def signsgd(learning_rate=1e-3, momentum=0.0, weight_decay=0.0):
    return optax.chain(
        _sign_of_trace(momentum),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
'''

_SPEC_MODULE = '''
"""Optimizer plugin {distribution!r}: its spec, published in entry_points.txt."""
{failing_import}
from ano_optimizer import OptimizerSpec

SPEC = OptimizerSpec(
    name={name!r},
    description="SignSGD with momentum (test plugin {distribution})",
    torch_class="{module}.torch_impl:SignSGD",
    keras_class="{module}.keras_impl:SignSGD",
    optax_factory="{module}.optax_impl:signsgd",
    has_betas=False,
    has_eps=False,
    has_momentum=True,
)
'''


def module_name(distribution: str) -> str:
    """The import name of the package :func:`write_plugin` writes for ``distribution``."""
    return distribution.replace("-", "_").replace(".", "_").lower()


def write_distribution(
    directory,
    distribution: str,
    entry_points: Mapping[str, str],
    files: Mapping[str, str] | None = None,
    version: str = "0.1.0",
) -> Path:
    """Write an installed distribution: its ``.dist-info`` and the given files.

    Args:
        directory: where to write (created if needed); the directory to put on ``sys.path``.
        distribution: distribution name, e.g. ``"my-optimizers"``.
        entry_points: ``{entry name: "module:attribute"}`` of the ``ano_optimizer.optimizers``
            group, written verbatim (so malformed entries can be written too).
        files: ``{relative path: text}`` written under ``directory``.
    """
    directory = Path(directory)
    info = directory / f"{module_name(distribution)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{key} = {value}" for key, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for relative, text in (files or {}).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return directory


def write_plugin(
    directory,
    *,
    distribution: str = PLUGIN_DISTRIBUTION,
    name: str = PLUGIN_NAME,
    broken: bool = False,
) -> str:
    """Write the SignSGD plugin distribution into ``directory``; return it, for ``sys.path``.

    Args:
        distribution: distribution name; the package is :func:`module_name` of it, so several
            plugins can share one directory.
        name: the registry name its spec and entry point declare (``"ano"`` makes a plugin
            that tries to take a built-in name).
        broken: the spec module fails to import (it imports a module that does not exist), as a
            plugin with a missing dependency does.
    """
    module = module_name(distribution)
    failing_import = f"import {module}_missing_dependency  # noqa: F401\n" if broken else ""
    spec_module = _SPEC_MODULE.format(
        distribution=distribution, name=name, module=module, failing_import=failing_import
    )
    write_distribution(
        directory,
        distribution,
        {name: f"{module}:SPEC"},
        {
            f"{module}/__init__.py": spec_module,
            f"{module}/torch_impl.py": _TORCH_IMPL,
            f"{module}/keras_impl.py": _KERAS_IMPL,
            f"{module}/optax_impl.py": _OPTAX_IMPL,
        },
    )
    return str(directory)


def signsgd_reference(param0, grads, *, lr, momentum=0.0, weight_decay=0.0) -> np.ndarray:
    """Float64 SignSGD: the parameter after each step (steps x shape)."""
    p = np.array(param0, dtype=np.float64)
    buf = np.zeros_like(p)
    trajectory = []
    for g in grads:
        buf = momentum * buf + np.asarray(g, dtype=np.float64)
        p = p * (1.0 - lr * weight_decay)
        p = p - lr * np.sign(buf)
        trajectory.append(p.copy())
    return np.stack(trajectory)


def env_with_path(*directories, **variables) -> dict[str, str]:
    """``os.environ`` with ``directories`` first on ``PYTHONPATH`` and ``variables`` set."""
    env = dict(os.environ)
    paths = [str(d) for d in directories] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({key: str(value) for key, value in variables.items()})
    return env


def site_packages_without_project(directory) -> str:
    """A directory that mirrors site-packages (by symlinks) minus this project's install.

    With ``python -S`` and only this directory (plus what you choose) on ``PYTHONPATH``,
    torch and the other dependencies import, but neither the editable ``ano_optimizer`` nor its
    ``.dist-info`` (entry points) is visible: a clean room for a wheel or a source checkout.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            lowered = entry.name.lower()
            if (
                lowered.startswith(("ano_optimizer", "ano-optimizer", "__editable__"))
                or lowered.endswith(".pth")
                or (directory / entry.name).exists()
            ):
                continue
            (directory / entry.name).symlink_to(entry)
    return str(directory)
