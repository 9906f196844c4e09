"""``capturable=True``: a step that reads nothing on the host, so a CUDA graph can capture it.

This machine has no GPU, so the capture itself runs in ``benchmarks/gpu_check.py``. What makes a
step capturable is checked here on CPU, with torch's fake tensors standing in for CUDA tensors:
a fake tensor has a device and a shape but no data, so any read of a value on the host
(``.item()``, ``float(t)``, ``bool(t)``) raises, and a dispatch mode records every
host-to-device copy. The default step does both (tested, so the check can fail); the
capturable step must do neither. The numbers are checked on real CPU tensors: the capturable
step computes its scalars on the device in float64, and the results equal the default step's
bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from optimizer_cases import CASES
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ano_optimizer import Ano, Anolog, fused

PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
    "fused": {"fused": True},
    "bf16-state": {"foreach": False, "state_dtype": torch.bfloat16},
}
SHAPES = [(300_000,), (17,), (8, 3, 3), (1,)]


class HostTraffic(TorchDispatchMode):
    """Records every operator that reads a device value on the host or copies host data to a
    device."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append(f"host read: {func}")
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "cpu" in devices and "cuda" in devices:
            self.events.append(f"host-to-device: {func}")
        return out


def _train(cls, kwargs, dtype=torch.float32, steps=6):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    optimizer = cls(params, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if step % (i + 2) == 1 else torch.randn(p.shape, generator=gen).to(dtype)
        optimizer.step()
        scheduler.step()
    return [
        t
        for p in params
        for t in (p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])
    ]


@pytest.mark.parametrize("lr", [3e-3, "tensor"], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_capturable_equals_the_default_step_bit_for_bit(case, path, dtype, lr):
    kwargs = {**case.kwargs, **PATHS[path]}
    runs = []
    for capturable in (False, True):
        # The scheduler changes a tensor lr in place: each run gets its own.
        value = kwargs["lr"]
        run_lr = torch.tensor(value) if lr == "tensor" else value
        runs.append(_train(case.cls, {**kwargs, "lr": run_lr, "capturable": capturable}, dtype))
    default, capturable = runs
    for a, b in zip(default, capturable, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_bfloat16_parameters_are_as_close_to_float32_as_the_default_step(foreach):
    """bfloat16 parameters: a capturable step's scalars are device tensors, which bfloat16
    arithmetic would round to 8 bits (``1 - lr·λ = 0.999`` to 1, losing the weight decay), so it
    computes in float32 per block and rounds once, as ``state_dtype`` does. That is not the
    default step's rounding, so both are measured against the same run in float32."""
    kwargs = {"lr": torch.tensor(1e-2), "weight_decay": 0.1, "foreach": foreach}
    reference = _train(Anolog, {**kwargs, "lr": torch.tensor(1e-2)}, torch.float32)
    default = _train(Anolog, {**kwargs, "lr": torch.tensor(1e-2)}, torch.bfloat16)
    capturable = _train(Anolog, {**kwargs, "capturable": True}, torch.bfloat16)

    def error(run, i):
        return float(
            (run[i].double() - reference[i].double()).abs().mean() / reference[i].abs().mean()
        )

    for i in range(3):  # parameter, exp_avg, exp_avg_sq of the large tensor
        assert capturable[i].dtype == torch.bfloat16
        assert error(capturable, i) <= 1.25 * error(default, i) < 5e-3


def _fake_cuda_optimizer(cls, capturable, options):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    optimizer = cls(params, lr=1e-2, weight_decay=0.1, capturable=capturable, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    return params, optimizer


def _host_traffic_of_steps(cls, capturable, options) -> list[str]:
    with FakeTensorMode():
        params, optimizer = _fake_cuda_optimizer(cls, capturable, options)
        optimizer.step()  # the first step creates the state, as warm-up before a capture does
        # A scheduler changes a device lr in place between replays.
        optimizer.param_groups[0]["lr"] = torch.full((), 5e-3, device="cuda")
        traffic = HostTraffic()
        try:
            with traffic:
                optimizer.step()
                optimizer.step()
        except DataDependentOutputException:
            assert traffic.events[-1].startswith("host read")  # a fake tensor has no value
        if capturable:
            assert all(optimizer.state[p]["step"].device.type == "cuda" for p in params)
        return traffic.events


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fused"], ids=str)
@pytest.mark.parametrize("cls", [Ano, Anolog], ids=lambda c: c.__name__)
def test_capturable_step_reads_nothing_on_the_host(cls, path):
    assert _host_traffic_of_steps(cls, True, PATHS[path]) == []


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fused"], ids=str)
def test_default_step_reads_values_on_the_host(path):
    """The control: without ``capturable`` the same check fails."""
    assert _host_traffic_of_steps(Ano, False, PATHS[path]) != []


@pytest.mark.parametrize("logarithmic_schedule", [False, True], ids=["ano", "anolog"])
def test_a_fused_step_on_the_gpu_reads_nothing_on_the_host(logarithmic_schedule):
    """The whole fused step on a CUDA group with bfloat16 state and a tensor lr: the operator's
    torch implementation computes its scalars (the bias corrections, Anolog's momentum
    weights, the rounding noise) on the device, and nothing is read on the host (a sync, and
    an error inside CUDA-graph capture). (GradScaler's tensors are left out: under fake
    tensors the step-count increment by the inf flag, ``_foreach_add_`` with a tensor, reads
    the flag on the host whatever the device's kernel does.)"""
    with FakeTensorMode():
        device = torch.device("cuda")
        params = [torch.randn(s, device=device) for s in SHAPES]
        grads = [torch.randn_like(p) for p in params]
        states = [[torch.zeros_like(p, dtype=torch.bfloat16) for p in params] for _ in range(2)]
        steps = [torch.zeros((), device=device) for _ in params]
        traffic = HostTraffic()
        with traffic:
            fused.fused_ano(
                params, grads, *states, steps,
                beta1=0.9, beta2=0.99, lr=torch.full((), 1e-3, device=device),
                weight_decay=0.1, eps=1e-8, logarithmic_schedule=logarithmic_schedule,
                maximize=False, checked=True,
            )  # fmt: skip
        assert traffic.events == []


def test_a_lr_or_step_off_the_parameters_device_is_a_clear_error():
    with FakeTensorMode():
        params, optimizer = _fake_cuda_optimizer(Ano, True, {"foreach": True})
        optimizer.step()
        optimizer.param_groups[0]["lr"] = torch.tensor(1e-3)  # left on the CPU
        with pytest.raises(ValueError, match=r"a tensor lr on the parameters' device \(cuda:0\)"):
            optimizer.step()
        optimizer.param_groups[0]["lr"] = 1e-3
        optimizer.state[params[0]]["step"] = torch.tensor(1.0)
        with pytest.raises(ValueError, match=r"state\['step'\] on the parameters' device"):
            optimizer.step()


def test_a_capturable_step_names_a_parameter_only_to_raise(monkeypatch):
    """Naming a parameter searches its group, so a capturable step that named every parameter
    on every step took time quadratic in their number; it names one only for an error."""
    import ano_optimizer.optimizer as optimizer_module

    named = []
    real = optimizer_module._describer

    def counting(index, group, params):
        describe = real(index, group, params)

        def counted(i):
            named.append(i)
            return describe(i)

        return counted

    monkeypatch.setattr(optimizer_module, "_describer", counting)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(50)]
    optimizer = Ano(params, lr=1e-2, capturable=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(3)
        optimizer.step()
    assert named == []
    optimizer.param_groups[0]["lr"] = torch.tensor(1e-2, device="meta")  # off the device
    with pytest.raises(ValueError, match=r"\(parameter 0 of parameter group 0 \(shape \(3,\)\)\)"):
        optimizer.step()
