"""Run fuzz cases of odd tensors through every execution path (used by ``test_fuzz.py``).

Usage: ``python fuzz_worker.py FIRST COUNT SEED``. For each case it prints ``BEGIN <case>``
before running it and ``RESULT <json>`` after, flushing each line, so that the parent process
knows which case a crash happened in and can start a new worker after it.

A case is three parameters with one normal step behind them, then one to three odd tensors put
in (freed or shrunk storage, zero tensors, views, overlaps, wrong dtypes, devices or shapes,
subclasses, inference tensors, odd step counts, odd learning rates and GradScaler values), then
one step. Every path runs the same case on its own copy; each reports ``ok`` with the
parameters after the step, or ``error`` with the error's type and message, and whether
anything changed in a raising call.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings

import torch
from torch.utils._pytree import tree_map

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ano_optimizer import Ano
from benchmarks.kernels import implementation

warnings.simplefilter("ignore")

PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
    "fused": {"fused": True},
    "fused-torch": {"fused": True},
    "capturable": {"capturable": True},
    "bf16-state": {"state_dtype": torch.bfloat16},
    "bf16-state-fused": {"state_dtype": torch.bfloat16, "fused": True},
    "8bit-state": {"state_dtype": torch.uint8},
    "8bit-state-fused": {"state_dtype": torch.uint8, "fused": True},
    # Two parameter groups with the same options: one call of ano::fused_step_.groups.
    "fused-2groups": {"fused": True},
    "8bit-state-fused-2groups": {"state_dtype": torch.uint8, "fused": True},
}
LR = 1e-2
# (64, 65) is large enough for 8-bit codes (blockwise8.MIN_NUMEL); the others keep float state.
SHAPES = [(5,), (4, 3), (2, 3, 2, 2), (17,), (64, 65)]


class Wrapper(torch.Tensor):
    """A wrapper subclass with no storage of its own (as torchao's float8 weights)."""

    @staticmethod
    def __new__(cls, inner):
        # Its inner tensor's shape, dtype, device and layout, but contiguous strides whatever
        # the inner tensor's (the paths must not rely on a wrapper's strides).
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, device=inner.device, layout=inner.layout
        )

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.inner if isinstance(t, Wrapper) else t

        def wrap(t):
            return Wrapper(t) if isinstance(t, torch.Tensor) and not isinstance(t, Wrapper) else t

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


class Plain(torch.Tensor):
    pass


def _freed(t):
    t.untyped_storage().resize_(0)
    return t


def _shrunk(t):
    t.untyped_storage().resize_(max(t.untyped_storage().nbytes() // 2, 1))
    return t


def _inference(t):
    with torch.inference_mode():
        return t.clone()


# Each oddity: (role, name, change(optimizer, param, grad) -> None, readable afterwards). A
# conversion always copies, so that every path gets a new tensor whatever its state's dtype.
def _grad(make):
    def change(optimizer, p):
        p.grad = make(p.grad)

    return change


def _state(key, make):
    def change(optimizer, p):
        optimizer.state[p][key] = make(optimizer.state[p][key])

    return change


def _data(make):
    def change(optimizer, p):
        p.data = make(p.data)

    return change


ODDITIES = {
    "grad freed": (_grad(lambda g: _freed(g.clone())), False),
    "grad shrunk": (_grad(lambda g: _shrunk(g.clone())), False),
    "grad zero tensor": (_grad(lambda g: torch._efficientzerotensor(g.shape, dtype=g.dtype)), True),
    "grad expanded": (_grad(lambda g: g.reshape(-1)[:1].expand(g.numel()).reshape(g.shape)), True),
    "grad transposed": (_grad(lambda g: g.t().contiguous().t() if g.dim() == 2 else g), True),
    "grad negative view": (_grad(lambda g: torch._neg_view(g.clone())), True),
    "grad sparse": (_grad(lambda g: g.to_sparse()), True),
    "grad subclass": (_grad(lambda g: g.clone().as_subclass(Plain)), True),
    "grad wrapper": (_grad(lambda g: Wrapper(g.clone())), True),
    "grad requires grad": (_grad(lambda g: g.clone().requires_grad_()), True),
    "param freed": (_data(lambda d: _freed(d)), False),
    "param shrunk": (_data(lambda d: _shrunk(d)), False),
    "param expanded": (_data(lambda d: d.reshape(-1)[:1].expand(d.numel()).reshape(d.shape)), True),
    "param negative view": (_data(lambda d: torch._neg_view(d.clone())), True),
    "param inference data": (_data(lambda d: _inference(d)), True),
    "param resized": (_data(lambda d: torch.randn(d.numel() + 3)), True),
    "param reshaped": (_data(lambda d: d.reshape(-1).clone()), True),
    "param float64": (_data(lambda d: d.double()), True),
    "param bfloat16": (_data(lambda d: d.bfloat16()), True),
    "param channels_last": (
        _data(lambda d: d.contiguous(memory_format=torch.channels_last) if d.dim() == 4 else d),
        True,
    ),
}
for key in ("exp_avg", "exp_avg_sq"):
    ODDITIES.update(
        {
            f"{key} freed": (_state(key, lambda t: _freed(t.clone())), False),
            f"{key} shrunk": (_state(key, lambda t: _shrunk(t.clone())), False),
            f"{key} expanded": (
                _state(key, lambda t: t.reshape(-1)[:1].expand(t.numel()).reshape(t.shape)),
                True,
            ),
            f"{key} transposed": (
                _state(key, lambda t: t.t().contiguous().t() if t.dim() == 2 else t),
                True,
            ),
            f"{key} wrong shape": (_state(key, lambda t: t.reshape(-1).clone()), True),
            f"{key} longer": (_state(key, lambda t: torch.zeros(t.numel() + 2)), True),
            f"{key} int32": (_state(key, lambda t: t.to(torch.int32, copy=True)), True),
            f"{key} float64": (_state(key, lambda t: t.to(torch.float64, copy=True)), True),
            f"{key} bfloat16": (_state(key, lambda t: t.to(torch.bfloat16, copy=True)), True),
            f"{key} meta": (_state(key, lambda t: t.to("meta")), True),
            f"{key} sparse": (_state(key, lambda t: t.to_sparse()), True),
            f"{key} inference": (_state(key, _inference), True),
            f"{key} negative view": (_state(key, lambda t: torch._neg_view(t.abs())), True),
            f"{key} zero tensor": (
                _state(key, lambda t: torch._efficientzerotensor(t.shape, dtype=t.dtype)),
                True,
            ),
            f"{key} wrapper": (_state(key, lambda t: Wrapper(t.clone())), True),
        }
    )
ODDITIES.update(
    {
        "step two numbers": (_state("step", lambda s: torch.stack([s, s])), True),
        "step int64": (_state("step", lambda s: s.to(torch.int64)), True),
        "step float64": (_state("step", lambda s: s.to(torch.float64, copy=True)), True),
        "step python int": (_state("step", lambda s: int(s)), True),
        "step meta": (_state("step", lambda s: s.to("meta")), True),
        "step freed": (_state("step", lambda s: _freed(s.clone())), False),
        "step no number": (_state("step", lambda s: s.reshape(1)[:0]), True),
        "step inference": (_state("step", _inference), True),
    }
)


# Odd values of the optimizer's scalars: the learning rate (of every group, so that paths
# with one group and with two see the same), GradScaler's handovers.
def _lr(make):
    def change(optimizer, p):
        for group in optimizer.param_groups:
            group["lr"] = make()

    return change


def _handed_over(name, make):
    def change(optimizer, p):
        setattr(optimizer, name, make())

    return change


ODDITIES.update(
    {
        "lr meta": (_lr(lambda: torch.tensor(LR, device="meta")), True),
        "lr two numbers": (_lr(lambda: torch.tensor([LR, LR])), True),
        "lr int64": (_lr(lambda: torch.tensor(1)), True),
        "lr nan": (_lr(lambda: torch.tensor(float("nan"))), True),
        "lr bfloat16": (_lr(lambda: torch.tensor(LR, dtype=torch.bfloat16)), True),
        "grad_scale meta": (
            _handed_over("grad_scale", lambda: torch.ones((), device="meta")),
            True,
        ),
        "grad_scale int64": (_handed_over("grad_scale", lambda: torch.tensor(2)), True),
        "found_inf meta": (_handed_over("found_inf", lambda: torch.zeros((), device="meta")), True),
        "found_inf two numbers": (_handed_over("found_inf", lambda: torch.zeros(2)), True),
    }
)

NAMES = sorted(ODDITIES)


def case(index: int, seed: int) -> dict:
    rng = random.Random(seed * 100003 + index)
    odd = [(rng.randrange(3), rng.choice(NAMES)) for _ in range(rng.randint(1, 3))]
    return {"index": index, "shapes": [rng.choice(SHAPES) for _ in range(3)], "odd": odd}


def _readable(t) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and type(t) is not Wrapper
        and t.device.type != "meta"
        and t.layout == torch.strided
        and not t._is_zerotensor()
    )


def run(spec: dict, path: str) -> dict:
    torch.manual_seed(spec["index"])
    params = [torch.nn.Parameter(torch.randn(s)) for s in spec["shapes"]]
    groups = [{"params": params[:1]}, {"params": params[1:]}] if "2groups" in path else params
    optimizer = Ano(groups, lr=LR, weight_decay=0.1, **PATHS[path])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    unreadable = set()
    freed = set()  # (position, role): torch's own ops crash reading a freed tensor
    for p in params:
        p.grad = torch.randn_like(p)
    for position, name in spec["odd"]:
        change, readable = ODDITIES[name]
        role = name.split(" ")[0]
        if (position, role) in freed:
            return {"path": path, "outcome": "setup refused", "message": f"{name}: freed before"}
        try:
            change(optimizer, params[position])
        except Exception as error:  # torch (or a second oddity) refused to build this input
            return {"path": path, "outcome": "setup refused", "message": str(error)[:200]}
        if not readable:
            unreadable.add(position)
            freed.add((position, role))
    before = {
        (i, key): t.detach().clone()
        for i, p in enumerate(params)
        if i not in unreadable
        for key, t in (("param", p), *optimizer.state[p].items())
        if _readable(t)
    }
    state_keys = {i: sorted(optimizer.state[p]) for i, p in enumerate(params)}
    choice = "torch" if path == "fused-torch" else "kernel"
    try:
        with implementation(choice), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the torch path's notice
            optimizer.step()
    except Exception as error:
        after = {
            (i, key): t
            for i, p in enumerate(params)
            if i not in unreadable
            for key, t in (("param", p), *optimizer.state[p].items())
            if _readable(t)
        }
        changed = sorted(
            f"{i}/{key}"
            for (i, key), old in before.items()
            if not (after.get((i, key)) is not None and _equal(after[(i, key)], old))
        )
        if {i: sorted(optimizer.state[p]) for i, p in enumerate(params)} != state_keys:
            changed.append("state keys")
        return {
            "path": path,
            "outcome": "error",
            "type": type(error).__name__,
            "message": str(error)[:300],
            "changed": changed,
        }
    return {
        "path": path,
        "outcome": "ok",
        "params": [_values(p) if i not in unreadable else None for i, p in enumerate(params)],
    }


def _equal(a, b) -> bool:
    a, b = a.detach(), b.detach()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.resolve_neg().double(), b.resolve_neg().double()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _values(p):
    t = p.detach()
    if type(t) is Wrapper or isinstance(t, Wrapper):
        t = t.inner
    return t.resolve_neg().double().reshape(-1).tolist()


def main() -> None:
    first, count, seed = (int(a) for a in sys.argv[1:4])
    for index in range(first, first + count):
        spec = case(index, seed)
        print(f"BEGIN {json.dumps(spec)}", flush=True)
        results = [run(spec, path) for path in PATHS]
        print(f"RESULT {json.dumps({'case': spec, 'results': results})}", flush=True)


if __name__ == "__main__":
    main()
