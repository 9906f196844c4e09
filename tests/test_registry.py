"""The optimizer registry: specs, lookups and their errors, and create_optimizer end to end.

Registering a spec changes process-wide state that other test modules iterate over, so every
test that registers runs in its own subprocess.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from reference import ano_reference

import ano_optimizer
from ano_optimizer import (
    Ano,
    Anolog,
    OptimizerSpec,
    create_optimizer,
    get_optimizer_class,
    get_optimizer_spec,
    list_optimizers,
)
from ano_optimizer.registry import optimizer_keywords
from ano_optimizer.registry.builtins import ANO, ANOLOG


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_builtins_are_registered_with_lazy_references():
    assert get_optimizer_spec("ano") is ANO
    assert get_optimizer_spec("anolog") is ANOLOG
    assert ANO.torch_class == "ano_optimizer.optimizer:Ano"
    assert ANO.keras_class == "ano_optimizer.keras.optimizers:Ano"
    assert ANOLOG.keras_class == "ano_optimizer.keras.optimizers:Anolog"
    assert ANO.source == ANOLOG.source == "built-in"
    assert ANO.has_betas and ANO.has_eps and not ANO.has_momentum
    assert ANO.optax_factory == "ano_optimizer.optax:ano"
    assert ANOLOG.optax_factory == "ano_optimizer.optax:anolog"
    assert ANO.frameworks == ANOLOG.frameworks == ("torch", "keras", "optax")


@pytest.mark.parametrize("name", list_optimizers(framework="torch"))
def test_declared_arguments_match_the_torch_class(name):
    """Integrations forward betas, eps and momentum by the spec's flags: each flag must agree
    with what the class's constructor accepts, for every registered optimizer."""
    spec = get_optimizer_spec(name)
    accepted = set(inspect.signature(get_optimizer_class(name, "torch")).parameters)
    for flag, keyword in (("has_betas", "betas"), ("has_eps", "eps"), ("has_momentum", "momentum")):
        assert getattr(spec, flag) == (keyword in accepted), (name, flag)
    assert set(spec.defaults) <= accepted, (name, spec.defaults)


def test_optimizer_keywords_is_the_constructor_table():
    """The table create_optimizer and the Hugging Face adapter check options against."""
    table = optimizer_keywords(Ano)
    assert "params" not in table
    assert table["lr"] == 1e-4 and table["betas"] == (0.92, 0.99)
    assert table["logarithmic_schedule"] is False and table["fused"] is None
    assert set(table) == set(inspect.signature(Ano).parameters) - {"params"}
    assert optimizer_keywords(torch.optim.SGD)["momentum"] == 0

    class TakesAnything(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1, **kwargs):
            super().__init__(params, dict(lr=lr, **kwargs))

    assert optimizer_keywords(TakesAnything) is None


@pytest.mark.parametrize("name", ["ANO", "Ano", "aNoLoG"])
def test_lookup_is_case_insensitive(name):
    assert get_optimizer_spec(name).name == name.lower()


def test_get_optimizer_class_torch():
    assert get_optimizer_class("ano") is Ano
    assert get_optimizer_class("AnoLog", "torch") is Anolog


def test_get_optimizer_class_optax_returns_the_factory():
    import ano_optimizer.optax

    assert get_optimizer_class("ano", "optax") is ano_optimizer.optax.ano
    assert get_optimizer_class("anolog", "optax") is ano_optimizer.optax.anolog


def test_unknown_name_lists_known_and_closest_names():
    with pytest.raises(ValueError, match="unknown optimizer 'anolg'") as info:
        get_optimizer_spec("anolg")
    message = str(info.value)
    assert "closest: anolog" in message
    assert "known optimizers: " in message and "ano, anolog" in message
    with pytest.raises(ValueError, match="no close match"):
        get_optimizer_class("sgdxyzzy")


def test_bad_lookup_arguments():
    with pytest.raises(TypeError, match="must be a string, got 3"):
        get_optimizer_spec(3)
    with pytest.raises(ValueError, match="unknown framework 'jax'; expected one of"):
        get_optimizer_class("ano", "jax")
    with pytest.raises(ValueError, match="unknown framework 'tf'"):
        list_optimizers(framework="tf")
    with pytest.raises(TypeError, match="pattern must be a string"):
        list_optimizers(["ano"])


def test_list_optimizers_filters():
    names = list_optimizers()
    assert names == sorted(names)
    assert {"ano", "anolog"} <= set(names)
    assert list_optimizers("anol*") == ["anolog", "anolog8bit"]
    assert list_optimizers("*8bit", framework="keras") == []
    assert list_optimizers("ANO") == ["ano"]
    assert list_optimizers("zz*") == []
    assert {"ano", "anolog"} <= set(list_optimizers(framework="keras"))
    assert {"ano", "anolog"} <= set(list_optimizers(framework="optax"))
    assert set(list_optimizers("ano*", framework="torch")) >= {"ano", "anolog"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "my_opt"}, "invalid name 'my_opt'"),
        ({"name": "Ano2"}, "invalid name 'Ano2'"),
        ({"name": ""}, "invalid name ''"),
        ({"description": ""}, "description must be a non-empty string"),
        ({"description": "two\nlines"}, "description must be one line"),
        ({"torch_class": "torch.optim.SGD"}, "invalid torch_class='torch.optim.SGD'"),
        ({"keras_class": "keras:"}, "invalid keras_class='keras:'"),
        ({"optax_factory": "optax.adam"}, "invalid optax_factory='optax.adam'"),
        (
            {"torch_class": None, "keras_class": None},
            "give at least one of torch_class, keras_class and optax_factory",
        ),
        ({"defaults": [("lr", 1)]}, "defaults must be a mapping"),
        ({"defaults": {"params": []}}, "invalid defaults key 'params'"),
        ({"defaults": {"not a name": 1}}, "invalid defaults key 'not a name'"),
        ({"has_betas": 1}, "has_betas must be True or False, got 1"),
        ({"source": ""}, "source must be a non-empty string"),
    ],
)
def test_spec_validation(changes, message):
    fields = {
        "name": "myopt",
        "description": "an optimizer",
        "torch_class": "torch.optim:SGD",
        "keras_class": None,
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimizerSpec(**{**fields, **changes})


def test_spec_is_immutable_and_hashable():
    defaults = {"momentum": 0.9}
    spec = OptimizerSpec("sgdm", "SGD with momentum", "torch.optim:SGD", None, defaults)
    defaults["momentum"] = 0.0  # the spec kept its own copy
    assert spec.defaults == {"momentum": 0.9}
    with pytest.raises(TypeError):
        spec.defaults["momentum"] = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    twin = OptimizerSpec("sgdm", "SGD with momentum", "torch.optim:SGD", None, {"momentum": 0.9})
    assert spec == twin and hash(spec) == hash(twin)
    assert spec != dataclasses.replace(twin, defaults={"momentum": 0.5})


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def _train(model, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 3, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_create_optimizer_matches_float64_reference_per_group():
    model = _tiny_model().double()
    lr, weight_decay, betas, eps = 1e-2, 0.1, (0.9, 0.99), 1e-8
    optimizer = create_optimizer(model, "ano", lr=lr, weight_decay=weight_decay, betas=betas)
    assert type(optimizer) is Ano
    decay_of = {
        name: group["weight_decay"]
        for group in optimizer.param_groups
        for name in group["param_names"]
    }
    assert decay_of == {
        "0.weight": weight_decay,
        "0.bias": 0.0,
        "1.weight": 0.0,
        "1.bias": 0.0,
        "2.weight": weight_decay,
        "2.bias": 0.0,
    }

    # Record the gradients each step saw, then replay them through the float64 oracle.
    start = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    grads = {n: [] for n in start}
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(4, 3, generator=generator, dtype=torch.float64)).pow(2).mean().backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.numpy().copy())
        optimizer.step()
    for n, p in model.named_parameters():
        expected, *_ = ano_reference(
            start[n],
            grads[n],
            [True] * 5,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=decay_of[n],
            logarithmic_schedule=False,
        )
        np.testing.assert_allclose(p.detach().numpy(), expected[-1], rtol=1e-12, atol=1e-14)


def test_create_optimizer_equals_hand_built_groups():
    model_a, model_b = _tiny_model(), _tiny_model()
    created = create_optimizer(model_a, "AnoLog", lr=1e-2, weight_decay=0.05, eps=1e-6)
    decay = [p for n, p in model_b.named_parameters() if n.endswith("weight") and p.ndim == 2]
    no_decay = [
        p for n, p in model_b.named_parameters() if not (n.endswith("weight") and p.ndim == 2)
    ]
    manual = Anolog(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay}],
        lr=1e-2,
        weight_decay=0.05,
        eps=1e-6,
    )
    assert all(g["logarithmic_schedule"] for g in created.param_groups)
    _train(model_a, created, 4)
    _train(model_b, manual, 4)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_create_optimizer_with_params_and_groups():
    model = _tiny_model()
    optimizer = create_optimizer(model.parameters(), "ano", weight_decay=0.1)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[0]["lr"] == ano_optimizer.hyperparameters.DEFAULT_LR

    groups = [
        {"params": model[0].parameters(), "lr": 1e-3},
        {"params": model[2].parameters(), "weight_decay": 0.0},
    ]
    optimizer = create_optimizer(groups, "ano", lr=1e-2, weight_decay=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_create_optimizer_errors_name_the_problem():
    model = _tiny_model()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'beta1'; it accepts: "):
        create_optimizer(model, "ano", beta1=0.9)
    with pytest.raises(ValueError, match=r"invalid lr=-1\.0"):
        create_optimizer(model, "ano", lr=-1.0)
    with pytest.raises(ValueError, match=r"invalid weight_decay=-0\.1"):
        create_optimizer(model, "ano", weight_decay=-0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        create_optimizer(model, "adamw")
    with pytest.raises(ValueError, match="no_weight_decay patterns need a model"):
        create_optimizer(model.parameters(), "ano", no_weight_decay=["*.bias"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameter"):
        create_optimizer(model, "ano")


def test_create_optimizer_no_weight_decay_patterns():
    model = _tiny_model()
    optimizer = create_optimizer(model, "ano", weight_decay=0.1, no_weight_decay=["2.*"])
    decayed = [g["param_names"] for g in optimizer.param_groups if g["weight_decay"]]
    assert decayed == [["0.weight"]]


def test_resume_from_state_dict_is_exact():
    torch.manual_seed(0)
    model = _tiny_model()
    optimizer = create_optimizer(model, "ano", lr=1e-2, weight_decay=0.1)
    _train(model, optimizer, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    # state_dict() shares the live moment tensors: copy, as torch.save would.
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    assert [g["param_names"] for g in saved_optimizer["param_groups"]] == [
        g["param_names"] for g in optimizer.param_groups
    ]
    _train(model, optimizer, 3, seed=7)

    resumed = _tiny_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = create_optimizer(resumed, "ano", lr=1e-2, weight_decay=0.1)
    resumed_optimizer.load_state_dict(saved_optimizer)
    _train(resumed, resumed_optimizer, 3, seed=7)
    for pa, pb in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.slow
def test_register_optimizer_end_to_end():
    code = """
        import torch
        from ano_optimizer import (
            OptimizerSpec, create_optimizer, get_optimizer_class, get_optimizer_spec,
            list_optimizers, register_optimizer,
        )

        spec = OptimizerSpec(
            name="sgdm",
            description="SGD with Nesterov momentum",
            torch_class="torch.optim:SGD",
            keras_class=None,
            defaults={"momentum": 0.9, "nesterov": True},
            has_betas=False,
            has_eps=False,
            has_momentum=True,
        )
        register_optimizer(spec)
        register_optimizer(spec)  # the same spec again: no-op
        assert get_optimizer_spec("SGDM") is spec
        assert "sgdm" in list_optimizers(framework="torch")
        assert "sgdm" not in list_optimizers(framework="keras")
        assert get_optimizer_class("sgdm") is torch.optim.SGD

        model = torch.nn.Linear(3, 2)
        optimizer = create_optimizer(model, "sgdm", lr=0.1, momentum=0.5)
        group = optimizer.param_groups[0]
        assert (group["momentum"], group["nesterov"], group["lr"]) == (0.5, True, 0.1)

        def raises(error, text, call, *args, **kwargs):
            try:
                call(*args, **kwargs)
            except error as exc:
                assert text in str(exc), str(exc)
            else:
                raise AssertionError(f"no {error.__name__}")

        raises(ValueError, "has no keras implementation (available for: torch)",
               get_optimizer_class, "sgdm", "keras")
        raises(TypeError, "got unexpected keyword argument(s) 'betas'",
               create_optimizer, model, "sgdm", betas=(0.9, 0.99))
        raises(ValueError, "'ano' is already registered (source: built-in",
               register_optimizer, OptimizerSpec("ano", "mine", "torch.optim:SGD", None))
        raises(ValueError, "'sgdm' is already registered",
               register_optimizer, OptimizerSpec("sgdm", "other", "torch.optim:SGD", None))
        raises(TypeError, "expects an OptimizerSpec", register_optimizer, "sgdm")

        # weight_decay: the spec's default unless given; optimizers without it still work.
        register_optimizer(OptimizerSpec(
            "adamwd", "AdamW, decay 0.05", "torch.optim:AdamW", None, {"weight_decay": 0.05}
        ))
        decays = lambda opt: sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays(create_optimizer(model, "adamwd")) == [0.0, 0.05]
        assert decays(create_optimizer(model, "adamwd", weight_decay=0.1)) == [0.0, 0.1]
        assert decays(create_optimizer(model, "adamwd", weight_decay=0.0)) == [0.0]
        register_optimizer(OptimizerSpec(
            "rprop", "Rprop", "torch.optim:Rprop", None, has_betas=False, has_eps=False
        ))
        assert type(create_optimizer(model, "rprop", lr=0.1)) is torch.optim.Rprop
        raises(TypeError, "unexpected keyword argument(s) 'weight_decay'",
               create_optimizer, model, "rprop", weight_decay=0.1)

        register_optimizer(OptimizerSpec("missing", "x", "no_such_module:Opt", None))
        raises(ImportError, "cannot import module 'no_such_module'", get_optimizer_class, "missing")
        register_optimizer(OptimizerSpec("notaclass", "x", "torch.optim:lr_scheduler", None))
        raises(TypeError, "not a class", get_optimizer_class, "notaclass")
        register_optimizer(OptimizerSpec("typo", "x", "torch.optim:Adamw", None))
        raises(ImportError, "has no attribute 'Adamw'", get_optimizer_class, "typo")

        # A spec for optax alone: the registry hands back the factory, a function.
        import optax
        register_optimizer(OptimizerSpec("optaxsgd", "SGD for optax", optax_factory="optax:sgd"))
        assert list_optimizers("optaxsgd", framework="optax") == ["optaxsgd"]
        assert list_optimizers("optaxsgd", framework="torch") == []
        assert get_optimizer_class("optaxsgd", "optax") is optax.sgd
        raises(ValueError, "has no torch implementation (available for: optax)",
               get_optimizer_class, "optaxsgd")
        register_optimizer(OptimizerSpec("optaxbad", "x", optax_factory="optax:__version__"))
        raises(TypeError, "not a function", get_optimizer_class, "optaxbad", "optax")
        print("ok")
    """
    assert run_python(code).strip() == "ok"
