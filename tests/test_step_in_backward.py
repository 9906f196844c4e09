"""StepInBackward: the same trajectory as the ordinary training loop, gradients freed during
backward(), exact resume, and clear errors."""

from __future__ import annotations

import pytest
import torch

from ano_optimizer import Ano, Anolog
from ano_optimizer.step_in_backward import StepInBackward


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(20, 8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 3, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 20),
    )
    model[4].weight = torch.nn.Parameter(torch.randn(20, 16) * 0.1)
    return model


def _batches(n=8):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 20, (16, 3), generator=gen), torch.randint(0, 20, (16,), generator=gen))
        for _ in range(n)
    ]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [
        (Ano, {"lr": 1e-2, "weight_decay": 0.1}),
        (Anolog, {"lr": 1e-2, "foreach": True}),
        (Ano, {"lr": 1e-2, "fused": True}),
    ],
    ids=["ano", "anolog-foreach", "ano-fused"],
)
def test_same_trajectory_as_the_ordinary_loop(optimizer_class, options):
    reference = _model()
    optimizer = optimizer_class(reference.parameters(), **options)
    for batch in _batches():
        optimizer.zero_grad()
        _loss(reference, batch).backward()
        optimizer.step()

    model = _model()
    trainer = StepInBackward(model.parameters(), optimizer_class, **options)
    for batch in _batches():
        _loss(model, batch).backward()
        assert all(p.grad is None for p in model.parameters())
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
        for key, value in optimizer.state[p_ref].items():
            assert torch.equal(value, trainer.optimizers[p].state[p][key]), key


def test_gradients_are_freed_while_backward_runs():
    """When the first layer's hook fires, the later layers' gradients are already gone."""
    model = _model()
    alive_at_last_hook = []
    StepInBackward(model.parameters(), lr=1e-3)
    first = model[0].weight  # its gradient is completed last
    first.register_post_accumulate_grad_hook(
        lambda _: alive_at_last_hook.append(
            [p.grad is not None for p in model.parameters() if p is not first]
        )
    )
    _loss(model, _batches(1)[0]).backward()
    assert alive_at_last_hook == [[False] * (len(list(model.parameters())) - 1)]


def test_resume_and_set_lr():
    batches = _batches()
    straight = _model()
    trainer = StepInBackward(straight.parameters(), lr=1e-2)
    for k, batch in enumerate(batches):
        trainer.set_lr(1e-2 / (k + 1))
        _loss(straight, batch).backward()

    first = _model()
    first_trainer = StepInBackward(first.parameters(), lr=1e-2)
    for k, batch in enumerate(batches[:4]):
        first_trainer.set_lr(1e-2 / (k + 1))
        _loss(first, batch).backward()
    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    resumed_trainer = StepInBackward(resumed.parameters(), lr=1.0)
    resumed_trainer.load_state_dict(first_trainer.state_dict())
    for k, batch in enumerate(batches[4:], start=4):
        resumed_trainer.set_lr(1e-2 / (k + 1))
        _loss(resumed, batch).backward()
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_remove_restores_ordinary_backward():
    model = _model()
    trainer = StepInBackward(model.parameters(), lr=1e-2)
    trainer.remove()
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, _batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_errors_are_clear_and_change_nothing():
    model = _model()
    with pytest.raises(TypeError, match="lrr"):
        StepInBackward(model.parameters(), lrr=1e-2)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        StepInBackward([torch.zeros(2)])
    trainer = StepInBackward(model.parameters(), lr=1e-2)
    _loss(model, _batches(1)[0]).backward()
    saved = trainer.state_dict()
    with pytest.raises(ValueError, match="expected 5"):
        trainer.load_state_dict({"optimizers": saved["optimizers"][:2]})
    bad = {"optimizers": [dict(entry) for entry in saved["optimizers"]]}
    bad["optimizers"][-1] = {"state": {}, "param_groups": [{"params": [0], "lr": 1.0}]}
    with pytest.raises(ValueError):
        trainer.load_state_dict(bad)
    assert trainer.state_dict()["optimizers"][0]["state"][0]["step"].item() == 1
