"""FSDP2 and DCP with 8-bit Ano: ``torchrun --nproc-per-node 2 fsdp2_8bit.py --out DIR``.

The first layer's weight (7 x 640) is large enough for 8-bit moments; FSDP2 shards its 7 rows
4 / 3 over the two ranks, and the moments' codes and per-row block scales are sharded alike.
For each path: 6 steps of training; then a run that checkpoints at step 3 with DCP, trains on,
and a fresh model and optimizer that load the checkpoint and train the same 3 steps.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from dcp import load_checkpoint, save_checkpoint
from dist_common import finish, loss_fn, save_result
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ano_optimizer import Ano

WORLD_SIZE, PER_RANK_BATCH, IN_FEATURES = 2, 4, 640
OPTIONS = {"lr": 3e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "state_dtype": torch.uint8}
PATHS = {"single": {"foreach": False}, "fused": {"fused": True}}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 7), nn.Tanh(), nn.Linear(7, 3))


def rank_batch(step: int, rank: int):
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD_SIZE * PER_RANK_BATCH, IN_FEATURES, generator=generator)
    y = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 3, generator=generator)
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    return x[rows], y[rows]


def reference_run(steps: int, path: str) -> dict[str, torch.Tensor]:
    """One process on the averaged per-rank gradients, as in ``dist_common.reference_run``."""
    model = make_model()
    optimizer = Ano(model.parameters(), **OPTIONS, **PATHS[path])
    for step in range(steps):
        per_rank = []
        for rank in range(WORLD_SIZE):
            model.zero_grad(set_to_none=True)
            loss_fn(model, *rank_batch(step, rank)).backward()
            per_rank.append([p.grad for p in model.parameters()])
        for param, *grads in zip(model.parameters(), *per_rank, strict=True):
            param.grad = sum(g / WORLD_SIZE for g in grads)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def sharded(path: str):
    model = make_model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model, Ano(model.parameters(), **OPTIONS, **PATHS[path])


def train(model, optimizer, steps: range) -> None:
    rank = dist.get_rank()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, *rank_batch(step, rank)).backward()
        optimizer.step()


def full(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    for path in PATHS:
        model, optimizer = sharded(path)
        train(model, optimizer, range(args.steps))
        weight = model[0].weight
        state = optimizer.state[weight]
        info = {
            "codes_are_dtensors": all(
                isinstance(state[k], DTensor)
                for k in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
            ),
            "codes_dtype": str(state["exp_avg"].dtype),
            "local_rows": [state[k].to_local().shape[0] for k in ("exp_avg", "exp_avg_scale")],
            "scale_shape": list(state["exp_avg_scale"].shape),
            "step": float(state["step"]),
        }
        trained = full(model)

        checkpoint = str(args.out / f"checkpoint-8bit-{path}")
        model, optimizer = sharded(path)
        train(model, optimizer, range(args.save_at))
        save_checkpoint(model, optimizer, checkpoint)
        train(model, optimizer, range(args.save_at, args.steps))
        uninterrupted = full(model)

        model, optimizer = sharded(path)
        load_checkpoint(model, optimizer, checkpoint)
        info["resumed_codes_dtype"] = str(optimizer.state[model[0].weight]["exp_avg"].dtype)
        train(model, optimizer, range(args.save_at, args.steps))
        resumed = full(model)
        if dist.get_rank() == 0:
            save_result(args.out, f"fsdp2-8bit-{path}", trained, **info)
            save_result(args.out, f"dcp-8bit-{path}-uninterrupted", uninterrupted)
            save_result(args.out, f"dcp-8bit-{path}-resumed", resumed)
    finish()


if __name__ == "__main__":
    main()
