"""A call that raises changes nothing: the constructor, add_param_group, step() and
load_state_dict(), for every execution path; state_dict() round-trips exactly; options are
checked wherever they come from; stochastic rounding depends on the optimizer's state alone."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap
import typing
import warnings

import pytest
import torch

from ano_optimizer import Ano
from ano_optimizer.step_in_backward import StepInBackward

PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
    "fused": {"fused": True},
    "capturable": {"capturable": True},
    "bf16-state": {"state_dtype": torch.bfloat16},
    "bf16-state-fused": {"state_dtype": torch.bfloat16, "fused": True},
}
each_path = pytest.mark.parametrize("path", PATHS, ids=list(PATHS))


def _trained(path: str, steps: int = 2, seed: int = 0):
    """A two-group optimizer (decayed matrix, no-decay vectors) after ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 5), (5,), (3,))]
    optimizer = Ano(
        [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:]}],
        lr=1e-2,
        **PATHS[path],
    )
    for _ in range(steps):
        _set_grads(params, gen)
        optimizer.step()
    return params, optimizer, gen


def _set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _snapshot(params, optimizer):
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(optimizer.param_groups),
    )


def _assert_unchanged(params, optimizer, snapshot):
    values, state_dict, groups = snapshot
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    _assert_same(optimizer.state_dict(), state_dict)
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        assert group.keys() == saved.keys()
        for key in group:
            if key != "params":
                assert _same(group[key], saved[key]), key


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.layout == b.layout
            and a.device == b.device
            and (a.is_meta or _equal_with_nans(a.to_dense(), b.to_dense()))  # meta: no values
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _equal_with_nans(a, b) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key, entry in a["state"].items():
        assert entry.keys() == b["state"][key].keys()
        for name, value in entry.items():
            assert _same(value, b["state"][key][name]), (key, name)
    assert len(a["param_groups"]) == len(b["param_groups"])
    for group, other in zip(a["param_groups"], b["param_groups"], strict=True):
        assert group.keys() == other.keys()
        assert all(_same(group[k], other[k]) for k in group)


def _twin_continues_alike(path, params, optimizer):
    """After a refused call, the optimizer steps exactly as an untouched twin does."""
    twin_params, twin, _ = _trained(path)
    for p, q in zip(params, twin_params, strict=True):
        with torch.no_grad():
            q.copy_(p)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    gen = torch.Generator().manual_seed(99)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, q, g in zip(params, twin_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params, strict=True))


def _entry(state_dict, index=0):
    return state_dict["state"][index]


def _freed(t):
    t = t.clone()
    t.untyped_storage().resize_(0)
    return t


# Each bad field: (how to spoil a copy of a valid state dict, text the error names).
_BAD_STATE_DICTS = {
    "step 'abc'": (lambda sd: _entry(sd).update(step="abc"), r"state\['step'\] must be a number"),
    "step of two numbers": (
        lambda sd: _entry(sd).update(step=torch.tensor([1.0, 2.0])),
        r"state\['step'\] must be one real number",
    ),
    "step -1": (lambda sd: _entry(sd).update(step=-1), r"whole number >= 0, got -1"),
    "step 2.5": (lambda sd: _entry(sd).update(step=torch.tensor(2.5)), "whole number >= 0"),
    "step nan": (lambda sd: _entry(sd).update(step=math.nan), "whole number >= 0, got nan"),
    "step True": (lambda sd: _entry(sd).update(step=True), "must be a number"),
    "negative exp_avg_sq": (
        lambda sd: _entry(sd).update(exp_avg_sq=-_entry(sd)["exp_avg_sq"].float() - 1),
        "holds negative values",
    ),
    "NaN exp_avg": (
        lambda sd: _entry(sd)["exp_avg"].view(-1).__setitem__(0, math.nan),
        "NaN or infinite",
    ),
    "infinite exp_avg_sq": (
        lambda sd: _entry(sd)["exp_avg_sq"].view(-1).__setitem__(3, math.inf),
        "NaN or infinite",
    ),
    "moment of another shape": (
        lambda sd: _entry(sd).update(exp_avg=torch.zeros(30)),
        r"has shape \(30,\), but the parameter has shape \(6, 5\)",
    ),
    "integer moment": (
        lambda sd: _entry(sd).update(exp_avg=torch.zeros(6, 5, dtype=torch.int32)),
        "has dtype torch.int32",
    ),
    "sparse moment": (
        lambda sd: _entry(sd).update(exp_avg=torch.zeros(6, 5).to_sparse()),
        "must be a dense tensor",
    ),
    "freed moment": (
        lambda sd: _entry(sd).update(exp_avg_sq=_freed(_entry(sd)["exp_avg_sq"])),
        "storage too small",
    ),
    "missing moment": (lambda sd: _entry(sd).pop("exp_avg"), "not an Ano/Anolog state dict"),
    "invalid betas": (
        lambda sd: sd["param_groups"][1].update(betas=(0.9, 0.3)),
        r"parameter group 1: invalid beta2=0.3",
    ),
    "fused=1": (lambda sd: sd["param_groups"][0].update(fused=1), "fused must be None, True or"),
    "a group fewer": (lambda sd: sd["param_groups"].pop(), "has 1 parameter groups"),
    "a parameter fewer": (
        lambda sd: sd["param_groups"][1]["params"].pop(),
        "holds 1 parameters in the state dict and 2",
    ),
    "state not a dict": (lambda sd: sd.update(state=[]), "'state' must be a dict"),
}


@each_path
@pytest.mark.parametrize("case", _BAD_STATE_DICTS, ids=list(_BAD_STATE_DICTS))
def test_a_refused_state_dict_changes_nothing_and_the_optimizer_steps_on(case, path):
    params, optimizer, _ = _trained(path)
    saved = copy.deepcopy(optimizer.state_dict())
    # The state dict to load comes from another run, so that loading it would change things.
    other = copy.deepcopy(_trained(path, steps=3, seed=1)[1].state_dict())
    spoil, message = _BAD_STATE_DICTS[case]
    spoil(other)
    # (torch itself would crash reading a freed tensor, so that one is not copied.)
    comparable = case not in ("state not a dict", "freed moment")
    given = copy.deepcopy(other) if comparable else None
    snapshot = _snapshot(params, optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(other)
    _assert_unchanged(params, optimizer, snapshot)
    if comparable:
        _assert_same(other, given)  # the caller's state dict is not changed either
    _assert_same(optimizer.state_dict(), saved)
    _twin_continues_alike(path, params, optimizer)


def _adamw_state_dict_with_ano_keys():
    model = torch.nn.Linear(3, 2)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    state_dict = adamw.state_dict()
    for group in state_dict["param_groups"]:
        group["logarithmic_schedule"] = False  # the one key AdamW lacks
    return model, state_dict


def test_a_foreign_optimizer_s_groups_are_refused_even_with_ano_s_keys_added():
    model, state_dict = _adamw_state_dict_with_ano_keys()
    optimizer = Ano(model.parameters())
    with pytest.raises(ValueError, match=r"holds \['amsgrad', .*not saved by Ano/Anolog"):
        optimizer.load_state_dict(state_dict)
    assert len(optimizer.state) == 0


def test_a_failure_inside_torch_s_loader_restores_the_optimizer():
    params, optimizer, _ = _trained("default")
    other = copy.deepcopy(_trained("default", steps=3, seed=1)[1].state_dict())
    snapshot = _snapshot(params, optimizer)

    def failing_hook(opt):
        raise RuntimeError("a post-hook failed")

    handle = optimizer.register_load_state_dict_post_hook(failing_hook)
    with pytest.raises(RuntimeError, match="a post-hook failed"):
        optimizer.load_state_dict(other)
    handle.remove()
    _assert_unchanged(params, optimizer, snapshot)
    _twin_continues_alike("default", params, optimizer)


def test_step_in_backward_loads_every_entry_or_none():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    trainer = StepInBackward(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    before = trainer.state_dict()
    other = copy.deepcopy(before)
    for entry in other["optimizers"]:
        entry["state"][0]["step"] = torch.tensor(7.0)
    other["optimizers"][-1]["state"][0]["step"] = "abc"  # only the last entry is bad
    with pytest.raises(ValueError, match=r"state\['step'\]"):
        trainer.load_state_dict(other)
    for entry, kept in zip(trainer.state_dict()["optimizers"], before["optimizers"], strict=True):
        _assert_same(entry, kept)


@each_path
def test_a_refused_step_changes_nothing(path):
    """A bad tensor in the second group: the first group is not stepped either, and the state
    the call created for parameters on their first step is gone again."""
    params, optimizer, gen = _trained(path)
    late = torch.nn.Parameter(torch.randn(4, generator=gen))
    optimizer.add_param_group({"params": [late]})
    _set_grads(params, gen)
    late.grad = torch.randn(4, generator=gen)
    optimizer.state[params[1]]["exp_avg"] = torch.zeros(7)  # group 1 no longer fits
    snapshot = _snapshot([*params, late], optimizer)
    with pytest.raises(RuntimeError, match=r"parameter 0 of parameter group 1 .*exp_avg"):
        optimizer.step()
    _assert_unchanged([*params, late], optimizer, snapshot)
    assert late not in optimizer.state


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group", "two-groups"])
@pytest.mark.parametrize(
    "state_dtype", [None, torch.bfloat16, torch.uint8], ids=["fp32", "bf16", "8bit"]
)
def test_a_refused_fused_cpu_step_changes_nothing(state_dtype, groups):
    """Fused CPU groups go to the kernel in one call, with no separate check: a tensor the
    kernel refuses (here a moment of the wrong size) leaves everything as it was, in every
    group, the state of a parameter on its first step included, and the Python checks name the
    tensor."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((64, 80), (5,), (3,))]
    param_groups = [{"params": params}]
    if groups == 2:
        param_groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1}]
    optimizer = Ano(param_groups, lr=1e-2, fused=True, state_dtype=state_dtype)
    _set_grads(params[:2], gen)
    optimizer.step()
    _set_grads(params, gen)  # params[2]'s first step
    optimizer.state[params[1]]["exp_avg"] = torch.zeros(7)
    snapshot = _snapshot(params, optimizer)
    with pytest.raises(RuntimeError, match=r"parameter 1 of parameter group 0 .*exp_avg"):
        optimizer.step()
    _assert_unchanged(params, optimizer, snapshot)
    assert params[2] not in optimizer.state
    optimizer.state[params[1]]["exp_avg"] = torch.zeros(5)
    optimizer.step()
    assert [optimizer.state[p]["step"].item() for p in params] == [2.0, 2.0, 1.0]


@each_path
def test_a_group_changed_after_construction_is_checked_at_the_next_step(path):
    params, optimizer, gen = _trained(path)
    _set_grads(params, gen)
    for key, value, message in (
        ("betas", (0.9, 0.3), "invalid beta2=0.3"),
        ("lr", -1.0, "invalid lr=-1.0"),
        (  # capturable groups say it per parameter
            "lr",
            torch.tensor(1e-2, device="meta"),
            r"tensor lr (must be on the CPU or )?on the parameters' device \(cpu\), got one on meta",
        ),
        ("eps", 0.0, "invalid eps=0.0"),
        ("maximize", 1, "maximize must be True or False, got 1"),
        ("foreach", "yes", "foreach must be None, True or False"),
    ):
        good = optimizer.param_groups[1][key]
        optimizer.param_groups[1][key] = value
        snapshot = _snapshot(params, optimizer)
        with pytest.raises(ValueError, match=message):
            optimizer.step()
        _assert_unchanged(params, optimizer, snapshot)
        optimizer.param_groups[1][key] = good
    optimizer.step()


@each_path
@pytest.mark.parametrize(
    "name, value, message",
    [
        ("grad_scale", torch.tensor(2.0, device="meta"), "grad_scale is a meta tensor"),
        ("found_inf", torch.tensor(0.0, device="meta"), "found_inf is a meta tensor"),
        ("found_inf", torch.tensor(0), "found_inf must be a tensor of one floating-point number"),
        ("grad_scale", torch.ones(2), r"grad_scale must be .* got 2 elements of torch.float32"),
        (
            "grad_scale",
            2.0,
            r"grad_scale must be a tensor of one floating-point number .*got float",
        ),
    ],
    ids=["meta-grad-scale", "meta-found-inf", "int-found-inf", "two-scales", "float-scale"],
)
def test_a_gradscaler_value_that_cannot_be_read_is_refused(path, name, value, message):
    """``grad_scale`` / ``found_inf`` as ``torch.amp.GradScaler`` hands them over, but odd: a
    meta tensor (which the operator's dispatch would send to its meta implementation, a step
    that does nothing), a wrong dtype or size. Refused, nothing changed, on a first step too."""
    params, optimizer, gen = _trained(path)
    late = torch.nn.Parameter(torch.randn(4, generator=gen))
    optimizer.add_param_group({"params": [late]})
    _set_grads([*params, late], gen)
    setattr(optimizer, name, value)
    snapshot = _snapshot([*params, late], optimizer)
    with pytest.raises(ValueError, match=message):
        optimizer.step()
    _assert_unchanged([*params, late], optimizer, snapshot)
    assert late not in optimizer.state
    delattr(optimizer, name)
    optimizer.step()
    assert optimizer.state[late]["step"].item() == 1.0


class _Recorded(torch.Tensor):
    """A wrapper subclass (every op runs on the inner tensor, as torchao's tensors do) that
    records the tensors in-place ops write to."""

    written: typing.ClassVar[list[int]] = []  # ids of the tensors in-place ops wrote to
    written_storages: typing.ClassVar[list[int]] = []  # and the addresses of their data

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, device=inner.device
        )

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def unwrap(t):
            return t.inner if isinstance(t, _Recorded) else t

        result = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func._schema.is_mutable and isinstance(args[0], _Recorded):
            cls.written.append(id(args[0]))
            cls.written_storages.append(args[0].inner.untyped_storage().data_ptr())
            return args[0]
        wrap = lambda t: cls(t) if type(t) is torch.Tensor else t  # noqa: E731
        return tree_map(wrap, result)


def _wrapper_beside_a_freed_gradient(wrapper: type, path: str):
    """A wrapper parameter in group 0 and, in group 1, a plain one whose gradient's storage was
    freed, so that a step is refused for group 1 after the wrapper has been checked. Returns
    the generator, the wrapper's first values, both parameters and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, generator=gen)
    wrapped = torch.nn.Parameter(wrapper(values.clone()))
    plain = torch.nn.Parameter(torch.randn(4, generator=gen))
    optimizer = Ano([{"params": [wrapped]}, {"params": [plain]}], lr=1e-2, **PATHS[path])
    wrapped.grad, plain.grad = wrapper(torch.randn(6, generator=gen)), torch.randn(4)
    plain.grad.untyped_storage().resize_(0)
    return gen, values, wrapped, plain, optimizer


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_a_wrapper_parameter_is_checked_without_writing_to_it(path):
    """A wrapper's data is hidden from the checks, so its dispatch is asked whether it takes
    an in-place update, through an alias with a version counter of its own: a step refused
    for another tensor leaves the wrapper's values and version counter as they were."""
    gen, values, wrapped, plain, optimizer = _wrapper_beside_a_freed_gradient(_Recorded, path)
    version = wrapped._version
    _Recorded.written.clear()
    with pytest.raises(RuntimeError, match="parameter 0 of parameter group 1"):
        optimizer.step()
    assert id(wrapped) not in _Recorded.written and wrapped._version == version
    assert torch.equal(wrapped.inner, values)
    plain.grad = torch.randn(4, generator=gen)
    optimizer.step()
    assert not torch.equal(wrapped.inner, values)


class _Traceable(_Recorded):
    """_Recorded with the traceable-wrapper protocol (``__tensor_flatten__``), as torchao's
    quantized tensors have: its inner tensor can be checked directly."""

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return _Traceable(inner_tensors["inner"])


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_a_traceable_wrapper_is_checked_through_its_inner_tensors_without_a_write(path):
    """The check reads a traceable wrapper's inner tensors and asks its dispatch on a copy: a
    refused step writes nothing to the wrapper's data (a write through a quantized wrapper
    could requantize it), and an inner tensor that cannot be updated in place is refused before
    anything changes."""
    gen, values, wrapped, plain, optimizer = _wrapper_beside_a_freed_gradient(_Traceable, path)
    _Recorded.written_storages.clear()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="parameter 0 of parameter group 1"):
            optimizer.step()
    assert wrapped.inner.untyped_storage().data_ptr() not in _Recorded.written_storages
    assert torch.equal(wrapped.inner, values)
    plain.grad = torch.randn(4, generator=gen)
    optimizer.step()
    assert not torch.equal(wrapped.inner, values)

    shared = torch.nn.Parameter(_Traceable(torch.randn(1, generator=gen).expand(6)))
    shared.grad = _Traceable(torch.randn(6, generator=gen))
    before = shared.inner.clone()
    optimizer = Ano([shared, plain], lr=1e-2, **PATHS[path])
    with pytest.raises(RuntimeError, match="holds an inner tensor that has elements that share"):
        optimizer.step()
    assert torch.equal(shared.inner, before) and optimizer.state[plain] == {}


class _FailsOnSign(torch.Tensor):
    """A parameter whose in-place update fails half way, as a kernel running out of memory
    would: its sign op raises once the step has begun changing tensors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("sign", "_foreach_sign"):
            raise torch.OutOfMemoryError("pretend the allocator ran out of memory")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("path", ["single", "foreach"])
def test_a_kernel_failing_midway_keeps_its_type_and_says_what_changed(path):
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(4, generator=gen))
    failing = torch.nn.Parameter(torch.randn(3, generator=gen).as_subclass(_FailsOnSign))
    optimizer = Ano([{"params": [plain]}, {"params": [failing]}], lr=1e-2, **PATHS[path])
    plain.grad, failing.grad = torch.randn(4), torch.randn(3)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        optimizer.step()
    (note,) = raised.value.__notes__
    assert "failed in parameter group 1 after changing tensors" in note
    assert "groups [0] were updated" in note and "groups none were not changed" in note


def test_state_dict_round_trips_exactly_through_load_and_deepcopy():
    for path in PATHS:
        _, optimizer, _ = _trained(path)
        saved = optimizer.state_dict()
        for other in (copy.deepcopy(optimizer), _loaded_into_fresh(path, optimizer)):
            _assert_same(other.state_dict(), saved)
        optimizer.load_state_dict(copy.deepcopy(saved))
        _assert_same(optimizer.state_dict(), saved)


def _loaded_into_fresh(path, optimizer):
    fresh = _trained(path, steps=0)[1]
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def test_a_1_1_0_state_dict_with_differentiable_loads_without_it():
    """1.1.0 copied torch's differentiable=False into every group it loaded or deep-copied."""
    _, optimizer, _ = _trained("default")
    saved = optimizer.state_dict()
    legacy = copy.deepcopy(saved)
    for group in legacy["param_groups"]:
        group["differentiable"] = False
    fresh = _trained("default", steps=0)[1]
    fresh.load_state_dict(legacy)
    _assert_same(fresh.state_dict(), saved)
    legacy["param_groups"][0]["differentiable"] = True  # a mode Ano does not have
    with pytest.raises(ValueError, match="differentiable"):
        fresh.load_state_dict(legacy)


@pytest.mark.parametrize(
    ("option", "value"),
    [("foreach", 1), ("fused", 1), ("fused", 0.0), ("capturable", 0), ("maximize", 1)],
)
def test_flags_are_true_false_or_none_only(option, value):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=f"{option} must be"):
        Ano([p], **{option: value})
    with pytest.raises(ValueError, match=f"{option} must be"):
        Ano([{"params": [p], option: value}])


def test_a_refused_group_leaves_the_caller_s_dicts_and_the_optimizer_as_they_were():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    first, second = {"params": [a]}, {"params": [b], "betas": (0.9, 0.3)}
    with pytest.raises(ValueError, match=r"beta2=0\.3"):
        Ano([first, second])
    assert first == {"params": [a]} and second == {"params": [b], "betas": (0.9, 0.3)}
    optimizer = Ano([first])
    assert optimizer.param_groups[0] is first and first["lr"] == 1e-4  # as in torch.optim
    for bad, error in (
        ({"params": [c], "eps": -1.0}, ValueError),
        ({"params": [a]}, ValueError),  # already in a group
        ({"params": [c], "fused": "yes"}, ValueError),
    ):
        given = dict(bad)
        with pytest.raises(error):
            optimizer.add_param_group(bad)
        assert bad == given and len(optimizer.param_groups) == 1
    group = {"params": [c], "lr": 0.5}
    optimizer.add_param_group(group)
    assert optimizer.param_groups[1] is group and group["betas"] == (0.92, 0.99)


def test_a_group_key_one_edit_from_an_option_warns_did_you_mean():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(UserWarning, match=r"'weight_decy' .* did you mean 'weight_decay'\?"):
        optimizer = Ano([{"params": [p], "weight_decy": 0.1}])
    with pytest.warns(UserWarning, match=r"'eps_' .* did you mean 'eps'\?"):
        optimizer.add_param_group({"params": [q], "eps_": 1e-6})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        framework_keys = {"lr_scale": 0.5, "layer_id": 3, "initial_lr": 1e-3, "name": "head"}
        Ano([{"params": [p], **framework_keys}]).add_param_group({"params": [q], "max_lr": 1})
        Ano([("weight", p)])  # named parameters: param_names


def _bf16_run(path, interleave, steps=4):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((300,), (20, 7))]
    optimizer = Ano(params, lr=1e-2, **PATHS[path])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        _set_grads(params, gen)
        optimizer.step()
        if interleave:
            torch.rand(1000)  # other code drawing from torch's random stream
    return params, optimizer


@pytest.mark.parametrize("path", ["bf16-state", "bf16-state-fused"])
def test_stochastic_rounding_depends_on_the_optimizer_alone(path):
    quiet, noisy = _bf16_run(path, False), _bf16_run(path, True)
    for a, b in zip(quiet[0], noisy[0], strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(quiet[1].state[a][key], noisy[1].state[b][key])


@pytest.mark.parametrize("path", ["bf16-state", "bf16-state-fused"])
def test_a_bfloat16_state_resume_is_bit_exact_without_restoring_torch_s_rng(path):
    straight, _ = _bf16_run(path, True, steps=6)
    params, optimizer = _bf16_run(path, True, steps=3)
    saved = copy.deepcopy(optimizer.state_dict())
    values = [p.detach().clone() for p in params]
    torch.manual_seed(12345)  # a resumed process's random stream is another one
    resumed = [torch.nn.Parameter(v) for v in values]
    optimizer = Ano(resumed, lr=1e-2, **PATHS[path])
    optimizer.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the first run's generator after its first 3 steps
        _set_grads(resumed, gen)
    for _ in range(3):
        _set_grads(resumed, gen)
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


_NO_COMPILER = textwrap.dedent(
    """
    import json, warnings, torch
    warnings.simplefilter("always")
    from ano_optimizer import Ano
    torch.manual_seed(0)
    shapes = [(50,), (7, 3), (1,)]
    fused = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    fused.append(torch.nn.Parameter(torch.randn(6, dtype=torch.float64)))
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    with warnings.catch_warnings(record=True) as caught:
        a, b = Ano(fused, lr=1e-2, fused=True), Ano(plain, lr=1e-2)
        for _ in range(3):
            for p, q in zip(fused, plain):
                g = torch.randn_like(p)
                p.grad, q.grad = g, g.clone()
            a.step()
            b.step()
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if "Ano" in str(w.message)],
        "steps": [a.state[p]["step"].item() for p in fused],
        "diff": max((p - q).abs().max().item() for p, q in zip(fused, plain)),
    }))
    """
)


@pytest.mark.slow
def test_fused_without_a_compiler_runs_on_the_path_its_warning_names(tmp_path):
    """No C++ compiler: the CPU kernel cannot be built (once, a missing compiler left every
    step failing while the step counts climbed). The operator's torch implementation steps
    every tensor, and one warning says so."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["steps"] == [3.0] * 4
    assert report["diff"] < 1e-5
    [message] = report["warnings"]
    assert "the C++ CPU kernel could not be built (no C++ compiler" in message
    assert "ano_optimizer.fused.torch_step" in message
