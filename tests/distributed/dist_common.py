"""Pieces shared by the distributed recipes and by ``tests/test_distributed.py``.

The recipes next to this file are ordinary training scripts, launched the way users launch them
(``torchrun``, ``accelerate launch``, ``deepspeed``). They build the same tiny model and feed it
the same data as the single-process reference below, so the test can compare the weights exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ano_optimizer import Ano, Anolog

WORLD_SIZE = 2
PER_RANK_BATCH = 4
IN_FEATURES, HIDDEN, OUT_FEATURES = 5, 7, 3  # 7 and 3 do not divide by 2: uneven FSDP2 shards
OPTIMIZERS = {"ano": Ano, "anolog": Anolog}
# Large enough for sign(m) to flip on some coordinates within a few steps, small enough to train.
HYPERPARAMETERS = {"lr": 3e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES))


def global_batch(step: int, world_size: int = WORLD_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world_size * PER_RANK_BATCH, IN_FEATURES, generator=generator)
    y = torch.randn(world_size * PER_RANK_BATCH, OUT_FEATURES, generator=generator)
    return x, y


def rank_batch(step: int, rank: int, world_size: int = WORLD_SIZE):
    """The slice of the global batch that ``rank`` trains on (what a DistributedSampler does)."""
    x, y = global_batch(step, world_size)
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    return x[rows], y[rows]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def train_steps(model, optimizer, steps: range) -> None:
    """This rank's share of ``steps`` training steps (an initialised process group is needed)."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, *rank_batch(step, rank, world_size)).backward()
        optimizer.step()


def make_optimizer(params, name: str = "ano", path: str = "single"):
    """An Ano/Anolog optimizer on the execution path ``path``: single, foreach or fused."""
    options = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return OPTIMIZERS[name](params, **HYPERPARAMETERS, **options[path])


def fused_available() -> bool:
    import inspect

    return "fused" in inspect.signature(Ano).parameters


def reference_run(
    steps: int, name: str = "ano", path: str = "single", world_size: int = WORLD_SIZE
) -> dict[str, torch.Tensor]:
    """One process, the whole global batch: the gradient every data-parallel engine computes.

    Each rank's gradient is divided by the world size and the results summed, which is exactly
    what DDP's all-reduce and FSDP2's reduce-scatter compute for two ranks (division by 2 is
    exact, and a sum of two floats does not depend on the order).
    """
    model = make_model()
    optimizer = make_optimizer(model.parameters(), name, path)
    for step in range(steps):
        per_rank = []
        for rank in range(world_size):
            model.zero_grad(set_to_none=True)
            loss_fn(model, *rank_batch(step, rank, world_size)).backward()
            per_rank.append([p.grad for p in model.parameters()])
        for param, *grads in zip(model.parameters(), *per_rank, strict=True):
            param.grad = sum(g / world_size for g in grads)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def global_batch_run(
    steps: int, name: str = "ano", path: str = "single"
) -> dict[str, torch.Tensor]:
    """One process, one backward over the whole global batch, as a user would train without
    any engine. Its loss averages all rows at once, so its gradient rounds differently from the
    average of the per-rank gradients: this run agrees with the engines only to rounding."""
    model = make_model()
    optimizer = make_optimizer(model.parameters(), name, path)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, *global_batch(step)).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def recipe_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="folder for the final weights")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--runs",
        type=_runs,
        default=[("ano", "single")],
        help="comma-separated OPTIMIZER:PATH pairs trained one after the other, e.g. "
        "ano:single,anolog:foreach (one launch amortises the start-up of the processes)",
    )
    return parser.parse_args()


def _runs(text: str) -> list[tuple[str, str]]:
    runs = []
    for item in text.split(","):
        name, _, path = item.partition(":")
        if name not in OPTIMIZERS or path not in ("single", "foreach", "fused"):
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected OPTIMIZER:PATH with OPTIMIZER in {sorted(OPTIMIZERS)} "
                "and PATH in single, foreach, fused"
            )
        runs.append((name, path))
    return runs


def save_result(out: Path, tag: str, weights: dict[str, torch.Tensor], **info: object) -> None:
    """Rank 0 writes the full (unsharded) weights and a JSON of facts the test checks."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in weights.items()}, out / f"{tag}.pt")
    (out / f"{tag}.json").write_text(json.dumps(info, sort_keys=True))


def finish() -> None:
    """End a recipe: every rank leaves the process group together, then the process exits at once.

    Gloo's worker threads release finished collectives on their own schedule. When the last
    reference to one that holds a tensor Python has seen (an FSDP2 all-gather, a ``full_tensor()``
    result, a bucket of DDP) is dropped after the interpreter has started to shut down, the thread
    needs the GIL inside a destructor that may not throw, and the process aborts: SIGABRT,
    ``terminate called without an active exception``. A core dump of one such abort (torch 2.14.1,
    about 1 run in 10 on a loaded 2-core machine) shows exactly this:
    ``~AsyncAllgatherCoalescedWork`` inside ``ProcessGroupGloo::runLoop``, the main thread in
    ``Py_FinalizeEx``. No barrier closes the race, because the barrier's own work holds the
    unfinished all-gathers, so the recipe skips the interpreter's shutdown instead; everything it
    produces has been written and flushed by then.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
