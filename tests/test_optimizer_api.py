"""Behaviour users rely on: arguments, errors, groups, closures, schedulers, compile, checkpoints."""

from __future__ import annotations

import copy
import doctest
import io
import math
import re

import pytest
import torch
from optimizer_cases import CASES

import ano_optimizer.optimizer
from ano_optimizer import Ano, Anolog


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(n)]


def _train(model, optimizer, batches, scheduler=None):
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_docstring_examples_run():
    results = doctest.testmod(ano_optimizer.optimizer, raise_on_error=False)
    assert results.attempted >= 2 and results.failed == 0


def test_positional_order_of_release_1_0_0():
    p = [torch.nn.Parameter(torch.zeros(2))]
    group = Ano(p, 1e-3, (0.9, 0.999), 0.01, 1e-7, True).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (
        1e-3,
        (0.9, 0.999),
        0.01,
        1e-7,
    )
    assert group["logarithmic_schedule"] is True
    assert Anolog(p).param_groups[0]["logarithmic_schedule"] is True
    assert Ano.__name__ == "Ano" and Anolog.__name__ == "Anolog"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
        ({"betas": (1.0, 0.99)}, "beta1=1.0"),
        ({"betas": (-0.1, 0.99)}, "beta1=-0.1"),
        ({"betas": (0.9, 0.4)}, "beta2=0.4"),
        ({"betas": (0.9, 1.0)}, "beta2=1.0"),
        ({"betas": (0.9,)}, "pair"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"eps": -1e-8}, "eps=-1e-08"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"logarithmic_schedule": "yes"}, "logarithmic_schedule"),
        ({"foreach": "fast"}, "foreach"),
        ({"capturable": 1}, "capturable must be True or False, got 1"),
    ],
)
def test_invalid_hyperparameters_name_the_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Ano([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_unknown_keyword_arguments_are_errors():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="betaz"):
        Ano(p, betaz=(0.9, 0.99))
    with pytest.raises(TypeError, match="logarithmic_schedule"):
        Anolog(p, logarithmic_schedule=False)
    with pytest.raises(TypeError):
        Ano(p, 1e-3, (0.9, 0.99), 0.0, 1e-8, False, False)  # flags are keyword-only


def test_invalid_group_is_rejected_before_it_is_added():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = Ano([p1])
    with pytest.raises(ValueError, match=r"beta2=0\.3"):
        optimizer.add_param_group({"params": [p2], "betas": (0.9, 0.3)})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="eps=0"):
        Ano([{"params": [p1]}, {"params": [p2], "eps": 0}])


def test_sparse_gradients_are_rejected_before_any_update():
    dense = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Embedding(5, 2, sparse=True)
    optimizer = Ano([dense, *emb.parameters()], lr=0.1)
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Ano does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and len(optimizer.state) == 0


def test_closure_runs_with_gradients_enabled():
    model = _model()
    optimizer = Ano(model.parameters(), lr=1e-2)
    x, y = _batches(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_parameters_without_gradient_keep_state_and_step():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = Ano([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    optimizer.step()
    b_state = copy.deepcopy(optimizer.state[b])
    b_value = b.detach().clone()
    b.grad = None
    for _ in range(3):
        optimizer.step()
    assert int(optimizer.state[a]["step"]) == 4 and int(optimizer.state[b]["step"]) == 1
    assert torch.equal(b.detach(), b_value)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[b][key], b_state[key])


def test_every_hyperparameter_is_a_group_option_and_saved():
    model = _model()
    w1, b1, w2, b2 = model.parameters()
    optimizer = Ano(
        [
            {"params": [w1, b1]},
            {"params": [w2], "lr": 3e-3, "betas": (0.5, 0.9), "eps": 1e-6, "weight_decay": 0.1},
            {"params": [b2], "logarithmic_schedule": True, "maximize": True},
        ],
        lr=1e-3,
    )
    _train(model, optimizer, _batches(3))
    groups = optimizer.state_dict()["param_groups"]
    assert groups[1]["betas"] == (0.5, 0.9) and groups[1]["weight_decay"] == 0.1
    assert groups[2]["logarithmic_schedule"] is True and groups[2]["maximize"] is True
    assert groups[0]["logarithmic_schedule"] is False


def test_groups_use_their_own_values():
    """A group's values act exactly like a separate optimizer with those values."""
    torch.manual_seed(0)
    w = [torch.randn(4, 3) for _ in range(2)]
    grads = [[torch.randn(4, 3) for _ in range(2)] for _ in range(6)]
    ps = [torch.nn.Parameter(t.clone()) for t in w]
    grouped = Ano(
        [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.05, "logarithmic_schedule": True}],
        lr=0.01,
    )
    qs = [torch.nn.Parameter(t.clone()) for t in w]
    separate = [Ano([qs[0]], lr=0.01), Anolog([qs[1]], lr=0.05)]
    for g in grads:
        for p, q, gi in zip(ps, qs, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        grouped.step()
        for o in separate:
            o.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


def test_tensor_lr_with_a_scheduler_matches_float_lr():
    batches = _batches(8)
    results = []
    for lr in (0.01, torch.tensor(0.01)):
        model = _model()
        optimizer = Ano(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        _train(model, optimizer, batches, scheduler)
        results.append([p.detach().clone() for p in model.parameters()])
        assert torch.is_tensor(optimizer.param_groups[0]["lr"]) == torch.is_tensor(lr)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_compiled_step_with_tensor_lr_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    batches = _batches(6)
    eager_model, compiled_model = _model(), _model()
    eager = Anolog(eager_model.parameters(), lr=torch.tensor(0.01), weight_decay=0.01)
    compiled = Anolog(compiled_model.parameters(), lr=torch.tensor(0.01), weight_decay=0.01)
    eager_sched = torch.optim.lr_scheduler.ExponentialLR(eager, gamma=0.7)
    compiled_sched = torch.optim.lr_scheduler.ExponentialLR(compiled, gamma=0.7)
    # As in torch's compiled-optimizer tutorial: compile a function that calls step(). An attached
    # lr scheduler wraps optimizer.step in a function dynamo skips, so Ano.step is its own frame.
    compiled_step = torch.compile(lambda: compiled.step(), backend=counter)
    for x, y in batches:
        for model, opt in ((eager_model, eager), (compiled_model, compiled)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        eager.step()
        compiled_step()
        eager_sched.step()
        compiled_sched.step()
    # The step count, the lr and the bias correction are tensors: one compilation for all steps.
    assert counter.frame_count == 1 and counter.op_count > 0
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _checkpoint_roundtrip(optimizer_state):
    buffer = io.BytesIO()
    torch.save(optimizer_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_checkpoint_resume_is_bit_for_bit(case, foreach, capturable):
    batches = _batches(10)
    model = _model()
    optimizer = case.cls(model.parameters(), **case.kwargs, foreach=foreach, capturable=capturable)
    _train(model, optimizer, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = _model()
    optimizer = case.cls(model.parameters(), **case.kwargs, foreach=foreach, capturable=capturable)
    _train(model, optimizer, batches[:4])
    model_state = _checkpoint_roundtrip(model.state_dict())
    optimizer_state = _checkpoint_roundtrip(optimizer.state_dict())

    resumed_model = _model(seed=123)
    resumed_model.load_state_dict(model_state)
    resumed = case.cls(
        resumed_model.parameters(), **case.kwargs, foreach=foreach, capturable=capturable
    )
    resumed.load_state_dict(optimizer_state)
    _train(resumed_model, resumed, batches[4:])
    for a, b in zip(uninterrupted, resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_restores_group_options_from_the_checkpoint():
    model = _model()
    optimizer = Ano(model.parameters(), lr=0.02, logarithmic_schedule=True, weight_decay=0.1)
    _train(model, optimizer, _batches(2))
    fresh = Ano(_model().parameters())
    fresh.load_state_dict(_checkpoint_roundtrip(optimizer.state_dict()))
    group = fresh.param_groups[0]
    assert group["logarithmic_schedule"] is True and group["lr"] == 0.02
    assert group["weight_decay"] == 0.1


def test_state_dict_from_another_optimizer_is_a_clear_error():
    model = _model()
    adamw = torch.optim.AdamW(model.parameters())
    _train(model, adamw, _batches(1))
    optimizer = Ano(model.parameters())
    with pytest.raises(ValueError, match="not saved by Ano/Anolog"):
        optimizer.load_state_dict(adamw.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, _batches(1))
    with pytest.raises(ValueError, match="not saved by Ano/Anolog"):
        optimizer.load_state_dict(sgd.state_dict())
    assert len(optimizer.state) == 0


def test_a_group_with_an_extra_key_reloads_its_own_state_dict():
    """A group built with a key another optimizer has (``momentum``) is accepted and saved with
    it; the very state dict loads into an identical optimizer, and resumes exactly."""

    def make(model):
        return Ano([{"params": list(model.parameters()), "momentum": 0.9}], lr=1e-2)

    model = _model()
    optimizer = make(model)
    _train(model, optimizer, _batches(2))
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["param_groups"][0]["momentum"] == 0.9
    twin_model = copy.deepcopy(model)
    twin = make(twin_model)
    twin.load_state_dict(saved)
    _train(model, optimizer, _batches(2))
    _train(twin_model, twin, _batches(2))
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [True, False])
def test_the_functional_api_finds_complex_tensors_itself(foreach):
    """``has_complex`` left at its default on complex tensors: the step runs as with
    ``has_complex=True`` (it once raised after the step counts had moved)."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(4, 3, dtype=torch.complex64, generator=gen) for _ in range(3)]
    results = []
    for has_complex in (False, True):
        p, m, v, step = (
            start.clone(),
            torch.zeros_like(start),
            torch.zeros_like(start),
            torch.tensor(0.0),
        )
        for g in grads:
            ano_optimizer.optimizer.ano(
                [p], [g], [m], [v], [step], foreach=foreach, has_complex=has_complex, beta1=0.9,
                beta2=0.99, lr=1e-2, weight_decay=0.1, eps=1e-8, logarithmic_schedule=False,
                maximize=False,
            )  # fmt: skip
        results.append((p, m, v, step))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert results[0][3].item() == 3.0


def test_state_dict_with_mismatched_shapes_is_a_clear_error():
    model = _model()
    optimizer = Ano(model.parameters())
    _train(model, optimizer, _batches(1))
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    target = Ano(other.parameters())
    with pytest.raises(ValueError, match=r"shape \(3, 16\), but the parameter has shape \(4, 16\)"):
        target.load_state_dict(optimizer.state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        Ano([{"params": [p]} for p in other.parameters()]).load_state_dict(optimizer.state_dict())
    assert len(target.state) == 0


def test_state_dict_of_release_1_0_0_loads_and_continues():
    """1.0.0 saved integer steps and groups without logarithmic_schedule."""
    model = _model()
    optimizer = Ano(model.parameters(), lr=0.01)
    _train(model, optimizer, _batches(3))
    saved = optimizer.state_dict()
    legacy = {
        "state": {
            k: {"step": int(v["step"]), "exp_avg": v["exp_avg"], "exp_avg_sq": v["exp_avg_sq"]}
            for k, v in saved["state"].items()
        },
        "param_groups": [
            {k: g[k] for k in ("lr", "betas", "weight_decay", "eps", "params")}
            for g in saved["param_groups"]
        ],
    }
    reference_model = copy.deepcopy(model)
    reference = Ano(reference_model.parameters(), lr=0.01)
    reference.load_state_dict(copy.deepcopy(saved))
    resumed = Ano(model.parameters(), lr=0.01)
    resumed.load_state_dict(copy.deepcopy(legacy))
    assert torch.is_tensor(resumed.state[next(model.parameters())]["step"])
    _train(model, resumed, _batches(2, seed=5))
    _train(reference_model, reference, _batches(2, seed=5))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_maximize_climbs():
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = Ano([p], lr=0.1, maximize=True)
    for _ in range(5):
        optimizer.zero_grad()
        (-(p - 1.0).pow(2).sum()).backward()
        optimizer.step()
    assert (p.detach() > 0.3).all()


def test_anolog_schedule_values():
    """β1_k = 1 − 1/ln(k+2): the first momentum weight is 1/ln 3, not the 1.0.0 release's."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = Anolog([p], lr=0.0)
    p.grad = torch.ones(1)
    optimizer.step()
    assert math.isclose(float(optimizer.state[p]["exp_avg"]), 1 / math.log(3), rel_tol=1e-6)
