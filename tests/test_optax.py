"""``ano_optimizer.optax`` against the float64 oracles, under jit, with schedules and masks.

The float64 tests turn on ``jax_enable_x64`` for their duration only (the ``x64`` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from optimizer_cases import CASES
from reference import ano_reference

from ano_optimizer import Anolog

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
ano_optax = pytest.importorskip("ano_optimizer.optax")

DATA = Path(__file__).resolve().parent / "data"
NPZ, META = DATA / "ano_trajectories.npz", DATA / "ano_trajectories.json"
SHAPES = {"w": (4, 3), "b": (3,), "nested": ((2, 2, 2), ())}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def optax_ano(hyper: dict, *, anolog: bool = False):
    """``ano`` (or ``anolog``) with a case's hyper-parameters, spelled as torch spells them
    (lr, betas, eps, weight_decay, logarithmic_schedule): the table's cases and the shared ones."""
    common = {"learning_rate": hyper["lr"], "b2": hyper["betas"][1], "eps": hyper["eps"],
              "weight_decay": hyper["weight_decay"]}  # fmt: skip
    if anolog:
        return ano_optax.anolog(**common)
    return ano_optax.ano(
        b1=hyper["betas"][0], logarithmic_schedule=hyper["logarithmic_schedule"], **common
    )


def optax_for_case(case):
    """The optax transformation with the hyper-parameters of a torch case of the shared table."""
    kw = case.reference_kwargs()
    transformation = optax_ano(kw, anolog=case.cls is Anolog)
    # optax minimises; maximising is minimising the negated objective.
    return optax.chain(optax.scale(-1.0), transformation) if kw["maximize"] else transformation


def _random_tree(rng, steps=None):
    def leaf(shape):
        size = (steps, *shape) if steps is not None else shape
        return rng.standard_normal(size)

    return jax.tree.map(
        leaf, SHAPES, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
    )


def _run(transformation, params, grads_per_step, *, jit=False):
    state = transformation.init(params)
    update = jax.jit(transformation.update) if jit else transformation.update
    trajectory = []
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return params, state, trajectory


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_case_matches_the_float64_oracle(case, x64):
    rng = np.random.default_rng(3)
    steps = 12
    params0 = _random_tree(rng)
    grads = _random_tree(rng, steps)
    params0_j = jax.tree.map(jnp.asarray, params0)
    per_step = [jax.tree.map(lambda g, i=i: jnp.asarray(g[i]), grads) for i in range(steps)]
    _, state, trajectory = _run(optax_for_case(case), params0_j, per_step)

    kw = case.reference_kwargs()
    leaves0, treedef = jax.tree.flatten(params0)
    grad_leaves = treedef.flatten_up_to(grads)
    got = [treedef.flatten_up_to(p) for p in trajectory]
    ano_state = _ano_state(state)
    mu, nu = treedef.flatten_up_to(ano_state.mu), treedef.flatten_up_to(ano_state.nu)
    for index, (p0, g) in enumerate(zip(leaves0, grad_leaves, strict=True)):
        expected, m, v, k = ano_reference(p0, list(g), [True] * steps, **kw)
        actual = np.stack([np.asarray(step[index]) for step in got])
        assert actual.dtype == np.float64
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(mu[index]), m, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(nu[index]), v, rtol=1e-10, atol=1e-14)
    assert int(ano_state.count) == k == steps


def _ano_state(state):
    """The ScaleByAnoState inside a chain's nested state."""
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, ano_optax.ScaleByAnoState))
        if isinstance(s, ano_optax.ScaleByAnoState)
    ]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("case", json.loads(META.read_text())["cases"], ids=lambda c: c["name"])
def test_matches_the_shared_paper_oracle(case, x64):
    """The spec's own float64 trajectories. optax counts steps for the whole pytree, so each
    tensor runs alone and receives only the steps on which it has a gradient."""
    data = np.load(NPZ)
    for i in range(len(case["shapes"])):
        key = f"{case['name']}/{i}"
        has_grad = data[f"{key}/has_grad"].astype(bool)
        transformation = optax_ano(case)
        grads = [
            jnp.asarray(g) for g, has in zip(data[f"{key}/grads"], has_grad, strict=True) if has
        ]
        _, state, trajectory = _run(transformation, jnp.asarray(data[f"{key}/param0"]), grads)
        expected = data[f"{key}/paper/params"][has_grad]
        np.testing.assert_allclose(np.stack(trajectory), expected, rtol=0, atol=1e-10)
        ano_state = _ano_state(state)
        np.testing.assert_allclose(ano_state.mu, data[f"{key}/paper/exp_avg"], atol=1e-10)
        np.testing.assert_allclose(
            ano_state.nu, data[f"{key}/paper/exp_avg_sq"], rtol=1e-10, atol=1e-14
        )
        assert int(ano_state.count) == int(has_grad.sum())


@pytest.mark.parametrize("name", ["ano", "anolog"])
def test_jit_gives_the_eager_result(name):
    rng = np.random.default_rng(5)
    factory = getattr(ano_optax, name)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _random_tree(rng))
    grads = [
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _random_tree(rng)) for _ in range(6)
    ]
    transformation = factory(learning_rate=1e-2, weight_decay=0.1)
    eager, eager_state, _ = _run(transformation, params, grads)
    jitted, jit_state, _ = _run(transformation, params, grads, jit=True)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(_ano_state(jit_state).count) == int(_ano_state(eager_state).count) == 6


def test_a_whole_train_step_compiles_with_a_schedule():
    """The usual JAX loop: loss, grad, update and apply under one jax.jit, the learning rate
    a schedule; the loss goes down."""
    x = jnp.linspace(-1.0, 1.0, 64)[:, None]
    y = 3.0 * x[:, 0] - 0.5
    params = {"w": jnp.zeros((1,)), "b": jnp.zeros(())}
    schedule = optax.linear_schedule(5e-2, 5e-3, transition_steps=200)
    optimizer = ano_optax.ano(learning_rate=schedule)
    state = optimizer.init(params)

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def train_step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(200):
        params, state, _ = train_step(params, state)
    assert float(loss_fn(params)) < 0.01 * first
    np.testing.assert_allclose(params["w"], [3.0], atol=0.1)


def test_a_schedule_scales_each_step_by_its_rate():
    """The direction is scale_by_ano's; step k (from 0) is multiplied by schedule(k)."""
    rng = np.random.default_rng(1)
    params = jnp.asarray(rng.standard_normal(5), jnp.float32)
    grads = [jnp.asarray(rng.standard_normal(5), jnp.float32) for _ in range(5)]
    schedule = optax.linear_schedule(1.0, 0.2, transition_steps=4)
    scheduled = ano_optax.ano(learning_rate=schedule)
    direction = ano_optax.scale_by_ano()
    s_state, d_state = scheduled.init(params), direction.init(params)
    for step, g in enumerate(grads):
        u_sched, s_state = scheduled.update(g, s_state, params)
        u_dir, d_state = direction.update(g, d_state, params)
        np.testing.assert_allclose(u_sched, -float(schedule(step)) * u_dir, rtol=1e-6)


@pytest.mark.parametrize("name", ["ano", "anolog"])
def test_inject_hyperparams_exposes_the_rate_in_the_state(name):
    """optax.inject_hyperparams passes every numeric hyper-parameter as a scalar array (traced
    under jit): the same steps as the plain transformation, and the rate can be changed."""
    factory = getattr(ano_optax, name)
    rng = np.random.default_rng(4)
    params = jnp.asarray(rng.standard_normal(6), jnp.float32)
    grads = [jnp.asarray(rng.standard_normal(6), jnp.float32) for _ in range(4)]
    plain, _, _ = _run(factory(learning_rate=1e-2, weight_decay=0.1), params, grads)
    injected = optax.inject_hyperparams(factory)(learning_rate=1e-2, weight_decay=0.1)
    got, state, _ = _run(injected, params, grads, jit=True)
    np.testing.assert_allclose(got, plain, rtol=1e-6)
    assert set(state.hyperparams) >= {"learning_rate", "b2", "eps", "weight_decay"}

    state.hyperparams["learning_rate"] = jnp.asarray(0.0)  # a frozen step: nothing moves
    updates, _ = injected.update(grads[0], state, got)
    np.testing.assert_array_equal(optax.apply_updates(got, updates), got)


def test_mask_limits_weight_decay_as_in_optax_adamw():
    params = {"w": jnp.ones(3), "b": jnp.ones(3)}
    grads = {"w": jnp.zeros(3), "b": jnp.zeros(3)}  # a zero gradient: only decay moves p
    mask = {"w": True, "b": False}
    for transformation in (
        ano_optax.ano(learning_rate=0.1, weight_decay=0.5, mask=mask),
        ano_optax.anolog(learning_rate=0.1, weight_decay=0.5, mask=lambda p: mask),
    ):
        state = transformation.init(params)
        updates, _ = transformation.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_allclose(new["w"], [0.95] * 3, rtol=1e-6)
        np.testing.assert_allclose(new["b"], [1.0] * 3)


def test_low_precision_leaves_keep_float32_moments(x64):
    """bf16 / f16 parameters: moments in float32, updates in the gradient's dtype, equal to the
    float32 computation on the same (low-precision) gradient values."""
    rng = np.random.default_rng(2)
    params = {
        "bf16": jnp.asarray(rng.standard_normal(8), jnp.bfloat16),
        "f16": jnp.asarray(rng.standard_normal(8), jnp.float16),
        "f32": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
        "f64": jnp.asarray(rng.standard_normal(()), jnp.float64),
    }
    transformation = ano_optax.scale_by_ano()
    state = transformation.init(params)
    assert {k: v.dtype for k, v in state.mu.items()} == {
        "bf16": jnp.float32,
        "f16": jnp.float32,
        "f32": jnp.float32,
        "f64": jnp.float64,
    }
    wide = jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float32)), params)
    wide_state = transformation.init(wide)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        updates, state = transformation.update(grads, state, params)
        wide_updates, wide_state = transformation.update(
            jax.tree.map(lambda g, w: g.astype(w.dtype), grads, wide), wide_state, wide
        )
        for key, update in updates.items():
            assert update.dtype == params[key].dtype
            np.testing.assert_array_equal(update, wide_updates[key].astype(update.dtype))
        params = optax.apply_updates(params, updates)
    assert all(
        params[key].dtype == dtype
        for key, dtype in (("bf16", jnp.bfloat16), ("f16", jnp.float16), ("f32", jnp.float32))
    )


def test_none_leaves_pass_through():
    params = {"w": jnp.ones(2), "frozen": None}
    transformation = ano_optax.ano(learning_rate=0.1)
    state = transformation.init(params)
    updates, state = transformation.update({"w": jnp.ones(2), "frozen": None}, state, params)
    assert updates["frozen"] is None
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ano_optax.ano(b1=1.0), "ano: invalid b1=1.0; it must be a float in [0, 1)"),
        (lambda: ano_optax.ano(b1=-0.1), "invalid b1=-0.1"),
        (lambda: ano_optax.ano(b2=0.4), "ano: invalid b2=0.4; it must be a float in [0.5, 1)"),
        (lambda: ano_optax.anolog(b2=1.0), "anolog: invalid b2=1.0"),
        (lambda: ano_optax.ano(b1="0.9"), "invalid b1='0.9'"),
        (lambda: ano_optax.ano(eps=0.0), "invalid eps=0.0"),
        (lambda: ano_optax.ano(weight_decay=-1.0), "invalid weight_decay=-1.0"),
        (lambda: ano_optax.ano(learning_rate=float("nan")), "invalid learning_rate=nan"),
        (lambda: ano_optax.ano(learning_rate=-1e-3), "invalid learning_rate=-0.001"),
        (lambda: ano_optax.ano(learning_rate="1e-3"), "invalid learning_rate='1e-3'"),
        (lambda: ano_optax.ano(learning_rate=jnp.ones(2)), "must be a scalar, got shape (2,)"),
        (lambda: ano_optax.ano(logarithmic_schedule="yes"), "logarithmic_schedule"),
        (lambda: ano_optax.scale_by_ano(b1=2), "scale_by_ano: invalid b1=2"),
        (lambda: ano_optax.ano(b1=jnp.asarray(1.0)), "ano: invalid b1=Array(1., dtype=float32"),
        (lambda: ano_optax.ano(eps=np.zeros(3)), "invalid eps: an array must be a scalar"),
        (
            lambda: optax.inject_hyperparams(ano_optax.ano)(b2=0.3).init(jnp.ones(2)),
            "ano: invalid b2=Array(0.3",
        ),
    ],
)
def test_invalid_hyperparameters_fail_at_construction(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value)


def test_non_float_leaves_are_refused_at_init():
    with pytest.raises(ValueError, match="real floating-point array, got a leaf of dtype int32"):
        ano_optax.ano().init({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})


def test_the_docstring_example_runs():
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(ano_optax.ano, "ano", globs={}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 1 and results.failed == 0


@pytest.mark.slow
def test_a_plugin_publishes_its_own_optax_factory(tmp_path):
    """The fixture plugin's SignSGD, found by name through its entry point, against its float64
    reference (in a subprocess: the registry reads entry points once per process)."""
    import subprocess
    import sys

    from plugin_fixture import PLUGIN_NAME, env_with_path, signsgd_reference, write_plugin

    code = f"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax
from ano_optimizer import get_optimizer_class, list_optimizers
assert {PLUGIN_NAME!r} in list_optimizers(framework="optax")
factory = get_optimizer_class({PLUGIN_NAME!r}, "optax")
rng = np.random.default_rng(0)
param0 = rng.standard_normal((3, 2))
grads = rng.standard_normal((4, 3, 2))
optimizer = factory(learning_rate=0.1, momentum=0.5, weight_decay=0.2)
params = jnp.asarray(param0)
state = optimizer.init(params)
for g in grads:
    updates, state = optimizer.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
print(json.dumps({{"module": factory.__module__, "param0": param0.tolist(),
                   "grads": grads.tolist(), "final": np.asarray(params).tolist()}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=env_with_path(write_plugin(tmp_path)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"] == "ano_fixture_plugin.optax_impl"
    expected = signsgd_reference(
        report["param0"], report["grads"], lr=0.1, momentum=0.5, weight_decay=0.2
    )
    np.testing.assert_allclose(report["final"], expected[-1], rtol=1e-12, atol=1e-15)
