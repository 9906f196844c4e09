"""DeepSpeed ZeRO stages 1-3 with Ano as the client optimizer, on CPU processes.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 deepspeed_train.py --out DIR --stages 1,2,3

DeepSpeed only trusts its own optimizers under ZeRO: ``zero_allow_untested_optimizer: true`` lets
it wrap Ano. ZeRO 1 and 2 hand Ano flat fp32 partitions of the parameters, ZeRO 3 partitioned
parameters; Ano is elementwise, so each rank updating its partition is the full update. Each
stage checkpoints halfway with ``engine.save_checkpoint`` and a new engine resumes from it with
``engine.load_checkpoint``.
"""

import argparse
from pathlib import Path

import deepspeed
import torch.distributed as dist
from dist_common import (
    OPTIMIZERS,
    PER_RANK_BATCH,
    finish,
    loss_fn,
    make_model,
    make_optimizer,
    rank_batch,
    save_result,
)


def config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PER_RANK_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="ano")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def new_engine(stage: int):
        model = make_model()
        optimizer = make_optimizer(model.parameters(), args.optimizer)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config(stage)
        )
        return engine

    def train_steps(engine, steps: range) -> None:
        for step in steps:
            x, y = rank_batch(step, rank, world_size)
            engine.backward(loss_fn(engine, x, y))
            engine.step()

    def full_weights(engine) -> dict:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.detach().clone() for k, v in engine.module.named_parameters()}

    save_at = args.steps // 2
    for stage in (int(s) for s in args.stages.split(",")):
        checkpoint = args.out / f"deepspeed-zero{stage}-checkpoint"
        engine = new_engine(stage)
        train_steps(engine, range(save_at))
        engine.save_checkpoint(checkpoint, tag="half")  # every rank writes its partition
        train_steps(engine, range(save_at, args.steps))
        uninterrupted = full_weights(engine)
        engine.destroy()

        # A restarted job: a new engine, then the checkpoint (weights and Ano's partitions).
        engine = new_engine(stage)
        engine.load_checkpoint(checkpoint, tag="half")
        train_steps(engine, range(save_at, args.steps))
        resumed = full_weights(engine)
        if rank == 0:
            tag = f"deepspeed-zero{stage}-{args.optimizer}"
            facts = {"stage": engine.zero_optimization_stage(), "version": deepspeed.__version__}
            save_result(args.out, tag, uninterrupted, **facts)
            save_result(args.out, f"{tag}-resumed", resumed, **facts)
        engine.destroy()
    finish()


if __name__ == "__main__":
    main()
