"""ZeroRedundancyOptimizer with Ano inside, checkpointed and resumed.

    torchrun --nproc-per-node 2 zero.py --out DIR

Each rank keeps Ano's state only for its partition of the parameters. The run checkpoints at
``--save-at`` (``consolidate_state_dict`` gathers the partitions on rank 0, which saves them),
then a new model and a new optimizer load that file and train to the end.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from dist_common import (
    HYPERPARAMETERS,
    OPTIMIZERS,
    finish,
    make_model,
    save_result,
    train_steps,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel


def build(name: str, foreach: bool):
    model = DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=OPTIMIZERS[name], foreach=foreach, **HYPERPARAMETERS
    )
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="ano")
    parser.add_argument("--foreach", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checkpoint = args.out / "zero-checkpoint.pt"

    model, optimizer = build(args.optimizer, args.foreach)
    train_steps(model, optimizer, range(args.save_at))
    local_states = len(optimizer.optim.state)  # Ano's state on this rank: its partition only
    optimizer.consolidate_state_dict(to=0)  # a collective: every rank calls it
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        full = optimizer.state_dict()
        torch.save({"model": model.module.state_dict(), "optimizer": full}, checkpoint)
    dist.barrier()

    # Resume into new objects, as a restarted job would.
    del model, optimizer
    model, optimizer = build(args.optimizer, args.foreach)
    saved = torch.load(checkpoint, weights_only=True)
    # ZeroRedundancyOptimizer.load_state_dict clears the other ranks' entries of its argument.
    saved_steps = [float(s["step"]) for s in saved["optimizer"]["state"].values()]
    model.module.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train_steps(model, optimizer, range(args.save_at, args.steps))

    local = torch.tensor([local_states])
    per_rank = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, local)
    if rank == 0:
        path = "foreach" if args.foreach else "single"
        save_result(
            args.out,
            f"zero-{args.optimizer}-{path}",
            model.module.state_dict(),
            local_states=[int(t) for t in per_rank],
            saved_steps=saved_steps,
        )
    finish()


if __name__ == "__main__":
    main()
