"""Distributed checkpoint (DCP) of an FSDP2 model trained with Ano, and an exact resume.

    torchrun --nproc-per-node 2 dcp.py --out DIR --phase save    # trains, checkpoints at --save-at
    torchrun --nproc-per-node 2 dcp.py --out DIR --phase resume  # fresh processes continue from it

Each rank writes and reads only its own shards; the checkpoint does not depend on the world size.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_common import (
    OPTIMIZERS,
    finish,
    make_model,
    make_optimizer,
    save_result,
    train_steps,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard


def sharded_model_and_optimizer(name: str):
    model = make_model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model, make_optimizer(model.parameters(), name)


def save_checkpoint(model, optimizer, checkpoint: str) -> None:
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=checkpoint)


def load_checkpoint(model, optimizer, checkpoint: str) -> None:
    # get_optimizer_state_dict on a fresh optimizer runs one zero-gradient, lr=0 step to create
    # the state it then fills in place; dcp.load overwrites all of it (step included).
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def dcp_initialisation_facts(name: str) -> dict:
    """What get_optimizer_state_dict's state-creating step does to a fresh Ano (checked by tests)."""
    model, optimizer = sharded_model_and_optimizer(name)
    before = [p.full_tensor() for p in model.parameters()]
    get_optimizer_state_dict(model, optimizer)
    states = [optimizer.state[p] for p in model.parameters()]
    moved = any(
        not torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters(), strict=True)
    )
    moments = [s[key].full_tensor() for s in states for key in ("exp_avg", "exp_avg_sq")]
    return {
        "init_step": float(states[0]["step"]),
        "init_moved_nothing": not moved and all(not m.any() for m in moments),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=("save", "resume"), required=True)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="ano")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3)
    args = parser.parse_args()
    checkpoint = str(args.out / f"checkpoint-{args.optimizer}")

    dist.init_process_group("gloo")
    model, optimizer = sharded_model_and_optimizer(args.optimizer)
    if args.phase == "save":
        train_steps(model, optimizer, range(args.save_at))
        save_checkpoint(model, optimizer, checkpoint)
        train_steps(model, optimizer, range(args.save_at, args.steps))  # the uninterrupted run
    else:
        facts = dcp_initialisation_facts(args.optimizer)
        load_checkpoint(model, optimizer, checkpoint)
        train_steps(model, optimizer, range(args.save_at, args.steps))

    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    facts = facts if args.phase == "resume" else {}
    state = optimizer.state[next(iter(model.parameters()))]
    if dist.get_rank() == 0:
        tag = f"dcp-{args.optimizer}-{args.phase}"
        save_result(args.out, tag, weights, step=float(state["step"]), **facts)
    finish()


if __name__ == "__main__":
    main()
