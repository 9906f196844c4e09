"""FSDP2 (``fully_shard``) with Ano: ``torchrun --nproc-per-node 2 fsdp2.py --out DIR``.

Every parameter becomes a DTensor sharded on dimension 0 (7 and 3 rows over 2 ranks: uneven
shards); Ano's state is created from those DTensors, so each rank holds only its shard of the
moments.
"""

import torch.distributed as dist
from dist_common import (
    finish,
    make_model,
    make_optimizer,
    recipe_arguments,
    save_result,
    train_steps,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shard(model) -> None:
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)


def train(name: str, path: str, steps: int, swap: bool = False):
    model = make_model()
    if swap:
        # What Accelerate's FSDP2 preparation does: the optimizer was built on the plain model,
        # and after sharding its groups get the new DTensor parameters in place of the old ones.
        optimizer = make_optimizer(model.parameters(), name, path)
        names = [n for n, _ in model.named_parameters()]
        shard(model)
        sharded = dict(model.named_parameters())
        optimizer.param_groups[0]["params"] = [sharded[n] for n in names]
    else:
        shard(model)
        # Create the optimizer after sharding: it must see the DTensor parameters.
        optimizer = make_optimizer(model.parameters(), name, path)
    train_steps(model, optimizer, range(steps))
    return model, optimizer


def main() -> None:
    args = recipe_arguments(__doc__)
    dist.init_process_group("gloo")
    for name, path, swap in [(*run, False) for run in args.runs] + [("ano", "single", True)]:
        model, optimizer = train(name, path, args.steps, swap)
        # full_tensor() all-gathers a DTensor: every rank must call it.
        weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
        first = next(iter(model.parameters()))
        state = optimizer.state[first]
        info = {
            "param_is_dtensor": isinstance(first, DTensor),
            "exp_avg_is_dtensor": isinstance(state["exp_avg"], DTensor),
            "local_rows": {k: v.to_local().shape[0] for k, v in model.state_dict().items()},
            "step": float(state["step"]),
        }
        if dist.get_rank() == 0:
            tag = f"fsdp2-{'swapped-' if swap else ''}{name}-{path}"
            save_result(args.out, tag, weights, **info)
    finish()


if __name__ == "__main__":
    main()
