"""``ano_optimizer._torch_internals``: torch's private helpers behind one version guard, each with
a fallback on public API. The fallbacks are forced here and must give what torch's helpers give,
and whole training runs must come out the same with every fallback in force."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ano_optimizer import _torch_internals as internals

ROOT = Path(__file__).resolve().parent.parent


def test_this_torch_is_in_the_guarded_range_so_its_internals_are_used():
    low, high = internals.TESTED_TORCH
    assert low <= internals._torch_version() <= high
    assert internals._KNOWN_TORCH


@pytest.fixture
def fallbacks(monkeypatch):
    monkeypatch.setattr(internals, "_KNOWN_TORCH", False)


def _odd_layouts():
    base = torch.randn(6, 4)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "sliced": base[:, 1:3],
        "strided": base[::2],
        "expanded": torch.randn(4, 1).expand(4, 5),
        "expanded-1": torch.randn(1, 3).expand(1, 3),
        "broadcast-row": torch.randn(3).expand(2, 3),
        "scalar": torch.tensor(1.0),
    }


def test_internal_overlap_fallback_agrees_with_torch(fallbacks):
    for name, t in _odd_layouts().items():
        expected = torch._debug_has_internal_overlap(t) == 1
        assert internals.has_internal_overlap(t) == expected, name


def test_scalar_dtype_fallback_agrees_with_torch(fallbacks):
    from torch.optim.optimizer import _get_scalar_dtype

    for default in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            assert internals.scalar_dtype() == _get_scalar_dtype() == default
        finally:
            torch.set_default_dtype(previous)


def test_foreach_default_fallback_agrees_with_torch_on_cpu(fallbacks):
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [torch.randn(3), torch.nn.Parameter(torch.randn(2)), torch.randn(2).double()]
    expected = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    assert internals.default_foreach(params) is expected is False


def test_grouping_fallback_agrees_with_torch(fallbacks):
    first = [torch.randn(2), torch.randn(3).double(), torch.randn(4), torch.randn(1).half()]
    second = [torch.randn_like(t) for t in first]
    ours = internals.group_by_device_and_dtype([first, second])
    theirs = torch.optim.Optimizer._group_tensors_by_device_and_dtype([first, second])
    assert ours.keys() == theirs.keys()
    for key, lists in ours.items():
        their_lists, _ = theirs[key]
        for mine, other in zip(lists, their_lists, strict=True):
            assert [id(t) for t in mine] == [id(t) for t in other]


def test_zero_tensor_check_needs_no_private_method():
    class NoProbe:  # an object without torch's _is_zerotensor: not a zero tensor
        pass

    assert internals.is_zero_tensor(torch._efficientzerotensor(3))
    assert not internals.is_zero_tensor(torch.zeros(3))
    assert not internals.is_zero_tensor(NoProbe())


_RUNS = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from ano_optimizer import Ano, _torch_internals

    if sys.argv[1] == "fallbacks":
        _torch_internals._KNOWN_TORCH = False
    results, warned = {}, []
    for name, options in {
        "default": {},
        "foreach": {"foreach": True},
        "single": {"foreach": False},
        "fused": {"fused": True},
        "fused-bf16": {"fused": True, "state_dtype": torch.bfloat16},
        "bf16": {"state_dtype": torch.bfloat16},
        "complex": {"complex": True},
    }.items():
        options = dict(options)
        dtype = torch.complex64 if options.pop("complex", False) else torch.float32
        gen = torch.Generator().manual_seed(5)
        shapes = [(300,), (7, 9), (1,), (200_000,)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
        opt = Ano(params, lr=1e-2, weight_decay=0.1, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                opt.step()
        warned += [str(w.message) for w in caught]
        results[name] = [torch.view_as_real(p.detach()).flatten().tolist()
                         if p.is_complex() else p.detach().flatten().tolist() for p in params]
        results[name + "-steps"] = [opt.state[p]["step"].item() for p in params]
        results[name + "-step-dtype"] = str(opt.state[params[0]]["step"].dtype)
    print(json.dumps({"results": results, "warned": warned}))
    """
)


def _runs(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RUNS, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_runs_the_same_with_every_fallback_in_force():
    usual, forced = _runs("internals"), _runs("fallbacks")
    # The fused path uses no private API: its kernel is the same with the fallbacks in force.
    assert not usual["warned"] and not forced["warned"], (usual["warned"], forced["warned"])
    assert usual["results"] == forced["results"]


def test_capture_check_raises_while_capturing_and_is_skipped_where_torch_lacks_it(monkeypatch):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    internals.capture_health_check(optimizer)  # not capturing: nothing to say
    calls = []
    monkeypatch.setattr(
        torch.optim.Optimizer,
        "_accelerator_graph_capture_health_check",
        lambda self: calls.append(1),
    )
    internals.capture_health_check(optimizer)
    assert calls == [1]
    monkeypatch.delattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check")
    monkeypatch.delattr(torch.optim.Optimizer, "_cuda_graph_capture_health_check")
    internals.capture_health_check(optimizer)  # the fallback: no check, no error


def test_dtensor_class_is_found_where_each_torch_keeps_it(monkeypatch):
    """torch 2.5+ keeps DTensor in torch.distributed.tensor; torch 2.4 has that module too,
    without it, and the class in torch.distributed._tensor (transformers imports both)."""
    import types

    import torch.distributed.tensor

    assert internals.dtensor_class() is torch.distributed.tensor.DTensor

    class OldDTensor(torch.Tensor):
        pass

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("t"))
    monkeypatch.setitem(sys.modules, "torch.distributed._tensor", types.ModuleType("_t"))
    assert internals.dtensor_class() is None
    sys.modules["torch.distributed._tensor"].DTensor = OldDTensor
    assert internals.dtensor_class() is OldDTensor


class _DefaultTorchFunction(torch.Tensor):
    pass


class _OwnTorchFunction(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs)


def test_torch_function_subclasses_are_turned_off_only_where_all_keep_torch_s_default(monkeypatch):
    """Off (no conversion of results) only where every subclass in the lists keeps torch's
    default ``__torch_function__``: one with its own is respected, plain tensors need nothing,
    and outside the known releases nothing private is used."""
    x = torch.zeros(2)
    default, own = x.as_subclass(_DefaultTorchFunction), x.as_subclass(_OwnTorchFunction)

    def turned_off(*lists):
        with internals.torch_function_subclasses_off(lists):
            return type(default + 1) is torch.Tensor  # no conversion of the result

    assert turned_off([x, default])
    assert not turned_off([x, torch.nn.Parameter(x)])
    assert not turned_off([default], [own])
    monkeypatch.setattr(internals, "_KNOWN_TORCH", False)
    assert not turned_off([x, default])
