"""torch.optim's generic optimizer contract, as PyTorch's own test suite states it.

PyTorch tests every optimizer of torch.optim from an ``OptimizerInfo`` record
(``torch.testing._internal.common_optimizers``, installed with torch): a function of the
configurations to try, one of the inputs that must be refused, and the implementations
(foreach, fused) it supports; generic tests then run every configuration, with each
implementation flag, through the same checks. The records below describe Ano and Anolog; the
tests are those of PyTorch's ``test/test_optim.py`` (``TestOptimRenewed``) that apply to an
optimizer without ``differentiable``, run on CPU.
"""

from __future__ import annotations

import functools
import io
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ano_optimizer import Ano, Anolog


def _machinery():
    """torch's OptimizerInfo module. Importing it freezes torch.backends' flags for the whole
    process (its common_utils calls disable_global_flags); that is undone, so the other tests
    of this process see torch as a user's program does."""
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal import common_optimizers

    if not frozen:
        setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
    return common_optimizers


co = _machinery()
OptimizerInput, ErrorOptimizerInput = co.OptimizerInput, co.ErrorOptimizerInput


def _inputs(log: bool):
    def optim_inputs_func(device, dtype=None):
        configs = [
            OptimizerInput(params=None, kwargs={}, desc="default"),
            OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
            OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
            OptimizerInput(
                params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize"
            ),
            OptimizerInput(params=None, kwargs={"betas": (0.5, 0.9)}, desc="small betas"),
            OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="Tensor lr"),
            OptimizerInput(
                params=None, kwargs={"weight_decay": 0.1, "capturable": True}, desc="capturable"
            ),
            OptimizerInput(
                params=None, kwargs={"state_dtype": torch.bfloat16}, desc="bfloat16 state"
            ),
        ]
        if not log:
            configs.append(
                OptimizerInput(params=None, kwargs={"logarithmic_schedule": True}, desc="log")
            )
        return configs

    return optim_inputs_func


def _error_inputs(device, dtype):
    errors = co.get_error_inputs_for_all_optims(device, dtype)
    for kwargs, regex in (
        ({"betas": (1.0, 0.99)}, r"invalid beta1=1\.0"),
        ({"betas": (0.9, 0.3)}, r"invalid beta2=0\.3"),
        ({"eps": 0.0}, r"invalid eps=0\.0"),
        ({"weight_decay": -1.0}, r"invalid weight_decay=-1\.0"),
        ({"lr": -1e-3}, r"invalid lr=-0\.001"),
        ({"fused": True, "foreach": True}, "fused=True and foreach=True are exclusive"),
        ({"foreach": 1}, "foreach must be None, True or False, got 1"),
        ({"state_dtype": torch.int8}, "invalid state_dtype"),
    ):
        errors.append(
            ErrorOptimizerInput(
                OptimizerInput(params=None, kwargs={"lr": 1e-2, **kwargs}, desc=regex),
                error_type=ValueError,
                error_regex=regex,
            )
        )
    sparse = Parameter(torch.randn(3, 2))
    sparse.grad = torch.randn(3, 2).to_sparse()
    errors.append(
        ErrorOptimizerInput(
            OptimizerInput(params=[sparse], kwargs={}, desc="sparse gradient"),
            error_on=co.OptimizerErrorEnum.STEP_ERROR,
            error_type=RuntimeError,
            error_regex="does not support sparse gradients",
        )
    )
    return errors


OPTIM_INFOS = [
    co.OptimizerInfo(
        cls,
        optim_inputs_func=_inputs(log=cls is Anolog),
        optim_error_inputs_func=_error_inputs,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
        has_capturable_arg=True,
        not_og_supported_flags=("foreach", "fused", "maximize", "capturable"),
    )
    for cls in (Ano, Anolog)
]
each_optim = pytest.mark.parametrize("info", OPTIM_INFOS, ids=lambda info: info.name)
DEVICE, DTYPE = "cpu", torch.float32


def _all_inputs(info, dtype=DTYPE):
    return co._get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, info)


def _weight_bias(contiguous=True, dtype=DTYPE):
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    weight = Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0])
    return weight, Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])


@each_optim
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for optim_input in info.optim_inputs_func(DEVICE):
        assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys()


@each_optim
def test_errors(info):
    for error_input in info.optim_error_inputs_func(DEVICE, DTYPE):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params
        if params is None:
            params = [Parameter(torch.randn(2, 3))]
        if error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    info.optim_cls(params, **optim_input.kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    info.optim_cls(params, **optim_input.kwargs)
        else:
            optimizer = info.optim_cls(params, **optim_input.kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer.step()


@each_optim
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(info, contiguous):
    for optim_input in info.optim_inputs_func(DEVICE):
        kwargs = {**optim_input.kwargs, "foreach": False}
        weight, bias = _weight_bias(contiguous)
        x = torch.randn(5)
        optimizer = info.optim_cls([weight, bias], **kwargs)

        def closure(optimizer=optimizer, weight=weight, bias=bias, x=x):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            optimizer.step(closure)
        if kwargs.get("maximize"):
            assert closure().item() > initial, optim_input.desc
        else:
            assert closure().item() < initial, optim_input.desc


@each_optim
def test_complex(info):
    for optim_input in _all_inputs(info, torch.complex64):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in complex_params
        ]
        complex_optimizer = info.optim_cls(complex_params, **optim_input.kwargs)
        real_optimizer = info.optim_cls(real_params, **optim_input.kwargs)
        for _ in range(3):
            for c, r in zip(complex_params, real_params, strict=True):
                r.grad = torch.randn_like(r)
                c.grad = torch.view_as_complex(r.grad) if c.is_complex() else r.grad.clone()
            real_optimizer.step()
            complex_optimizer.step()
            for c, r in zip(complex_params, real_params, strict=True):
                ours = torch.view_as_real(c) if c.is_complex() else c
                torch.testing.assert_close(ours, r, msg=optim_input.desc)


def _derived(info, flag: str, dtype=torch.float64):
    """torch's _test_derived_optimizers: a small model plus a 0-d parameter, 7 steps with the
    gradients set to None on one of them, with ``flag`` False then True."""
    for optim_input in info.optim_inputs_func(DEVICE):
        runs = []
        for value in (False, True):
            kwargs = {**deepcopy(optim_input.kwargs), flag: value}
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
            ).to(dtype)
            x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
            # torch's test takes torch.empty(()): uninitialized, so two runs could differ.
            empty = torch.zeros((), dtype=dtype, requires_grad=True)
            empty.grad = torch.rand_like(empty)
            params = [*model.parameters(), empty]
            optimizer = info.optim_cls(params, **kwargs)
            for i in range(7):
                optimizer.zero_grad()
                if i != 3:
                    model(x).sum().backward()
                optimizer.step()
            runs.append((params, optimizer))
        (params_a, opt_a), (params_b, opt_b) = runs
        for a, b in zip(params_a, params_b, strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, d=optim_input.desc: f"{flag}: {d}: {m}")
            for key, value in opt_a.state[a].items():
                torch.testing.assert_close(value, opt_b.state[b][key], msg=optim_input.desc)


@each_optim
def test_foreach_matches_forloop(info):
    _derived(info, "foreach")


@each_optim
def test_fused_matches_forloop(info):
    _derived(info, "fused")


@each_optim
def test_param_groups_weight_decay(info):
    for optim_input in _all_inputs(info):
        weight, bias = _weight_bias()
        x = torch.randn(5)
        optimizer = info.optim_cls(
            [
                {"params": [weight], **optim_input.kwargs},
                {"params": [bias], **{**optim_input.kwargs, "weight_decay": 0.0}},
            ]
        )
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
        assert (loss.item() > initial) == bool(optim_input.kwargs.get("maximize")), optim_input.desc


@each_optim
def test_param_groups_lr(info):
    for optim_input in _all_inputs(info):
        kwargs = dict(optim_input.kwargs)
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        weight, bias = _weight_bias()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.clone()
        x = torch.randn(5)
        optimizer = info.optim_cls(
            [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], lr=1e-28
        )
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert (loss.item() > initial) == bool(kwargs.get("maximize")), optim_input.desc
        # A step is at most lr-sized: lr = 1e-28 leaves the parameter as it was.
        torch.testing.assert_close(irrelevant, irrelevant_clone)


@each_optim
def test_step_is_noop_when_params_have_no_grad(info):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone().detach() for p in params]
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert all(torch.equal(p, o) for p, o in zip(params, old, strict=True))


@each_optim
def test_step_is_noop_for_zero_grads(info):
    param = torch.randn((5, 1), requires_grad=True)
    old = param.clone().detach()
    for optim_input in _all_inputs(info):
        if optim_input.kwargs.get("weight_decay", 0) != 0:
            continue  # decoupled weight decay moves parameters without a gradient
        optimizer = info.optim_cls([param], **optim_input.kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert torch.equal(param, old), optim_input.desc


@each_optim
def test_optimizer_can_be_printed(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in _all_inputs(info):
        text = repr(info.optim_cls(params, **optim_input.kwargs))
        assert text.startswith(info.name) and "lr:" in text


def _assert_state_dicts_close(a: dict, b: dict) -> None:
    """torch's TestCase.assertEqual on state dicts: tensors close, everything else equal (the
    groups hold a torch.dtype, which torch.testing.assert_close does not compare)."""
    torch.testing.assert_close(a["state"], b["state"])
    assert a["param_groups"] == b["param_groups"]


def _fwd_bwd(optimizer, weight, bias, x):
    optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


@each_optim
def test_state_dict_deterministic(info):
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3, requires_grad=True)
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(_fwd_bwd, optimizer, weight, bias, x)
        for _ in range(10):
            optimizer.step(closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
        closure_c = functools.partial(_fwd_bwd, optimizer_c, weight_c, bias_c, x)
        optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
        for _ in range(10):
            optimizer.step(closure)
            optimizer_c.step(closure_c)
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)
        _assert_state_dicts_close(optimizer.state_dict(), optimizer_c.state_dict())
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert (
            optimizer.state_dict()["param_groups"][-1]
            == optimizer_c.state_dict()["param_groups"][-1]
        )


@each_optim
def test_can_load_older_state_dict(info):
    for optim_input in _all_inputs(info):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        x = torch.rand(1, 4, 16, 16)
        optimizer = info.optim_cls(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        old = deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in ("maximize", "foreach", "fused", "differentiable", "capturable"):
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()


@each_optim
def test_load_nontensor_step(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


@each_optim
def test_save_load_equality_with_weights_only(info):
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls([weight, bias], **optim_input.kwargs)
        for _ in range(3):
            optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        _assert_state_dicts_close(loaded, optimizer.state_dict())


@each_optim
def test_deepcopy_copies_all_public_attrs(info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(deepcopy(optimizer))


@each_optim
def test_step_pre_and_post_hooks(info):
    """Optimizer.register_step_pre_hook/post_hook and the global ones run around step()."""
    params = [Parameter(torch.randn(2, 3))]
    params[0].grad = torch.rand_like(params[0])
    for optim_input in _all_inputs(info):
        optimizer = info.optim_cls(params, **optim_input.kwargs)
        calls = []

        def hook(name, calls=calls):
            return lambda opt, args, kwargs: calls.append(name)

        handles = [
            optimizer.register_step_pre_hook(hook("pre")),
            optimizer.register_step_post_hook(hook("post")),
            register_optimizer_step_pre_hook(hook("global pre")),
        ]
        optimizer.step()
        for handle in handles:
            handle.remove()
        optimizer.step()
        assert calls == ["global pre", "pre", "post"], optim_input.desc


@each_optim
def test_state_dict_and_load_state_dict_hooks(info):
    params = [Parameter(torch.randn(2, 3))]
    params[0].grad = torch.rand_like(params[0])
    optimizer = info.optim_cls(params)
    optimizer.step()

    def pre(opt):
        opt.state[params[0]]["step"] += 1

    optimizer.register_state_dict_pre_hook(pre)
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    state_dict = optimizer.state_dict()
    assert state_dict["extra"] == 1 and state_dict["state"][0]["step"].item() == 2.0
    seen = []
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: seen.append("pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.append("post"))
    optimizer.load_state_dict(state_dict)
    assert seen == ["pre", "post"]


@each_optim
def test_tensor_lr_matches_float_lr(info):
    for optim_input in info.optim_inputs_func(DEVICE):
        if isinstance(optim_input.kwargs.get("lr"), torch.Tensor):
            continue
        runs = []
        for as_tensor in (False, True):
            torch.manual_seed(0)
            weight, bias = _weight_bias()
            lr = optim_input.kwargs.get("lr", 1e-4)
            kwargs = {**optim_input.kwargs, "lr": torch.tensor(lr) if as_tensor else lr}
            optimizer = info.optim_cls([weight, bias], **kwargs)
            x = torch.randn(5)
            for _ in range(5):
                optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
            runs.append((weight.detach().clone(), bias.detach().clone()))
        # A float32 tensor lr rounds the float lr; otherwise the same arithmetic.
        for a, b in zip(*runs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=optim_input.desc)
