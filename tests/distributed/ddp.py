"""DistributedDataParallel with Ano: ``torchrun --nproc-per-node 2 ddp.py --out DIR``."""

import torch.distributed as dist
from dist_common import (
    finish,
    loss_fn,
    make_model,
    make_optimizer,
    rank_batch,
    recipe_arguments,
    save_result,
)
from torch.nn.parallel import DistributedDataParallel


def train(name: str, path: str, steps: int, bucket_view: bool = False) -> DistributedDataParallel:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # gradient_as_bucket_view: each .grad is a view into DDP's communication bucket (less memory).
    model = DistributedDataParallel(make_model(), gradient_as_bucket_view=bucket_view)
    # Ano is elementwise: it only needs the averaged gradient that DDP leaves in .grad.
    optimizer = make_optimizer(model.parameters(), name, path)
    for step in range(steps):
        x, y = rank_batch(step, rank, world_size)
        optimizer.zero_grad(set_to_none=not bucket_view)  # bucket views are zeroed in place
        loss_fn(model, x, y).backward()
        optimizer.step()
    return model


def main() -> None:
    args = recipe_arguments(__doc__)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    for name, path in args.runs:
        for bucket_view in (False, True):
            model = train(name, path, args.steps, bucket_view)
            if dist.get_rank() == 0:
                tag = f"ddp-{'bucket-view-' if bucket_view else ''}{name}-{path}"
                save_result(args.out, tag, model.module.state_dict())
    finish()


if __name__ == "__main__":
    main()
