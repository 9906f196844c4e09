"""Float64 runs of Ano/Anolog against the float64 oracles: the shared trajectories and our own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from optimizer_cases import CASES, Case
from reference import ano_reference

from ano_optimizer import Ano

# The float64 trajectories of the spec's oracle, copied from the project's shared/reference
# (their source) so that a clone runs every oracle test.
DATA = Path(__file__).resolve().parent / "data"
NPZ, META = DATA / "ano_trajectories.npz", DATA / "ano_trajectories.json"


def shared_cases():
    return json.loads(META.read_text())["cases"]


def _run_torch(param0s, grads, has_grads, make_optimizer, steps):
    params = [torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64)) for p0 in param0s]
    optimizer = make_optimizer(params)
    trajectory = [[] for _ in params]
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.tensor(grads[i][step]) if has_grads[i][step] else None
        optimizer.step()
        for i, p in enumerate(params):
            trajectory[i].append(p.detach().clone().numpy())
    return params, optimizer, [np.stack(t) for t in trajectory]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", shared_cases(), ids=lambda c: c["name"])
def test_matches_shared_paper_oracle(case, foreach):
    data = np.load(NPZ)
    n = len(case["shapes"])
    key = [f"{case['name']}/{i}" for i in range(n)]

    def make(params):
        return Ano(
            params,
            lr=case["lr"],
            betas=tuple(case["betas"]),
            weight_decay=case["weight_decay"],
            eps=case["eps"],
            logarithmic_schedule=case["logarithmic_schedule"],
            foreach=foreach,
        )

    params, optimizer, trajectory = _run_torch(
        [data[f"{k}/param0"] for k in key],
        [data[f"{k}/grads"] for k in key],
        [data[f"{k}/has_grad"] for k in key],
        make,
        case["steps"],
    )
    for i, k in enumerate(key):
        np.testing.assert_allclose(trajectory[i], data[f"{k}/paper/params"], rtol=0, atol=1e-10)
        state = optimizer.state[params[i]]
        np.testing.assert_allclose(state["exp_avg"].numpy(), data[f"{k}/paper/exp_avg"], atol=1e-10)
        np.testing.assert_allclose(
            state["exp_avg_sq"].numpy(), data[f"{k}/paper/exp_avg_sq"], rtol=1e-10, atol=1e-14
        )
        assert int(state["step"]) == int(data[f"{k}/has_grad"].sum())


@pytest.mark.parametrize("case", shared_cases(), ids=lambda c: c["name"])
def test_own_reference_matches_shared_oracle(case):
    """Our NumPy oracle is checked against the shared one, so it can stand in when that is absent."""
    data = np.load(NPZ)
    for i in range(len(case["shapes"])):
        k = f"{case['name']}/{i}"
        trajectory, m, v, _ = ano_reference(
            data[f"{k}/param0"],
            data[f"{k}/grads"],
            data[f"{k}/has_grad"],
            lr=case["lr"],
            betas=case["betas"],
            eps=case["eps"],
            weight_decay=case["weight_decay"],
            logarithmic_schedule=case["logarithmic_schedule"],
        )
        np.testing.assert_allclose(trajectory, data[f"{k}/paper/params"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(m, data[f"{k}/paper/exp_avg"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(v, data[f"{k}/paper/exp_avg_sq"], rtol=1e-12, atol=1e-15)


def test_official_release_differs_only_where_the_spec_says():
    """Where the 1.0.0 oracle exists (ordinary gradients) it agrees with the paper to ~1e-7."""
    data = np.load(NPZ)
    for case in shared_cases():
        if "official-1.0.0" not in case["oracles"]:
            continue
        for i in range(len(case["shapes"])):
            k = f"{case['name']}/{i}"
            paper, official = data[f"{k}/paper/params"], data[f"{k}/official-1.0.0/params"]
            assert np.abs(paper - official).max() < 1e-6


def _random_problem(seed, shapes, steps, grad_scale=1.0, missing_every=0, zero_frac=0.0):
    rng = np.random.default_rng(seed)
    param0s = [rng.standard_normal(s) for s in shapes]
    grads, has = [], []
    for i, s in enumerate(shapes):
        g = rng.standard_normal((steps, *s)) * grad_scale
        g[rng.random(g.shape) < zero_frac] = 0.0
        h = np.ones(steps, dtype=bool)
        if missing_every and i == len(shapes) - 1:
            h[::missing_every] = False
        g[~h] = 0.0
        grads.append(g)
        has.append(h)
    return param0s, grads, has


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_own_reference(case, foreach):
    shapes = [(5, 7), (7,), (3, 2, 2)]
    steps = 20
    param0s, grads, has = _random_problem(hash(case.id) % 2**31, shapes, steps, missing_every=3)
    params, optimizer, trajectory = _run_torch(
        param0s, grads, has, lambda p: case.cls(p, **case.kwargs, foreach=foreach), steps
    )
    for i in range(len(shapes)):
        expected, m, v, k = ano_reference(param0s[i], grads[i], has[i], **case.reference_kwargs())
        np.testing.assert_allclose(trajectory[i], expected, rtol=0, atol=1e-10)
        state = optimizer.state[params[i]]
        np.testing.assert_allclose(state["exp_avg"].numpy(), m, rtol=0, atol=1e-10)
        np.testing.assert_allclose(state["exp_avg_sq"].numpy(), v, rtol=1e-10, atol=1e-14)
        assert int(state["step"]) == k


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_tiny_gradients_and_exact_zeros(foreach):
    """ε outside the square root matters for tiny gradients; sign(0) = 0 for exact zeros."""
    shapes = [(40,)]
    param0s, grads, has = _random_problem(7, shapes, 15, grad_scale=1e-5, zero_frac=0.3)
    case = Case("tiny-gradients", Ano, {"lr": 1e-3})
    _, _, trajectory = _run_torch(
        param0s, grads, has, lambda p: case.cls(p, **case.kwargs, foreach=foreach), 15
    )
    expected, *_ = ano_reference(param0s[0], grads[0], has[0], **case.reference_kwargs())
    np.testing.assert_allclose(trajectory[0], expected, rtol=0, atol=1e-12)
    always_zero = (grads[0] == 0).all(axis=0)
    np.testing.assert_array_equal(trajectory[0][-1][always_zero], param0s[0][always_zero])


def test_tensor_larger_than_one_block_matches_reference():
    """The cache-blocked single-tensor path splits large tensors; the seams must not show."""
    from ano_optimizer import optimizer as module

    numel = module._CHUNK_NUMEL * 2 + 12345
    param0s, grads, has = _random_problem(3, [(numel,)], 4)
    case = Case("multi-block", Ano, {"lr": 1e-3, "weight_decay": 0.1})
    _, _, trajectory = _run_torch(
        param0s, grads, has, lambda p: case.cls(p, **case.kwargs, foreach=False), 4
    )
    expected, *_ = ano_reference(param0s[0], grads[0], has[0], **case.reference_kwargs())
    np.testing.assert_allclose(trajectory[0], expected, rtol=0, atol=1e-10)
