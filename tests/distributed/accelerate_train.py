"""Hugging Face Accelerate with Ano on two CPU processes, with a save_state/load_state resume.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port 29500 \\
        accelerate_train.py --out DIR

On a machine without GPUs ``--multi_gpu`` starts the processes through torchrun and
``Accelerator(cpu=True)`` joins them with gloo (``distributed_type`` MULTI_CPU).
``accelerate launch --cpu --num_processes 2`` alone starts a single process unless an MPI hostfile
is given (``--mpirun_hostfile``).
"""

from accelerate import Accelerator
from dist_common import (
    finish,
    loss_fn,
    make_model,
    make_optimizer,
    rank_batch,
    recipe_arguments,
    save_result,
)


def prepared(accelerator: Accelerator, name: str, path: str):
    model = make_model()
    optimizer = make_optimizer(model.parameters(), name, path)
    return accelerator.prepare(model, optimizer)


def train_steps(accelerator: Accelerator, model, optimizer, steps: range) -> None:
    for step in steps:
        x, y = rank_batch(step, accelerator.process_index, accelerator.num_processes)
        accelerator.backward(loss_fn(model, x, y))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = recipe_arguments(__doc__)
    save_at = args.steps // 2
    accelerator = Accelerator(cpu=True)
    for name, path in args.runs:
        checkpoint = args.out / f"accelerate-state-{name}-{path}"
        model, optimizer = prepared(accelerator, name, path)
        train_steps(accelerator, model, optimizer, range(save_at))
        accelerator.save_state(checkpoint)  # model, Ano's state, RNG states
        train_steps(accelerator, model, optimizer, range(save_at, args.steps))
        uninterrupted = accelerator.get_state_dict(model)
        accelerator.free_memory(model, optimizer)

        # A restarted job: new objects, prepared again, then the saved state loaded into them.
        model, optimizer = prepared(accelerator, name, path)
        accelerator.load_state(checkpoint)
        train_steps(accelerator, model, optimizer, range(save_at, args.steps))
        resumed = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            facts = {
                "distributed_type": str(accelerator.distributed_type),
                "num_processes": accelerator.num_processes,
            }
            save_result(args.out, f"accelerate-{name}-{path}", uninterrupted, **facts)
            save_result(args.out, f"accelerate-resumed-{name}-{path}", resumed, **facts)
        accelerator.free_memory(model, optimizer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish()


if __name__ == "__main__":
    main()
