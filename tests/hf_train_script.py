"""An ordinary Hugging Face training script: it never imports ano_optimizer.

Run through ``ano-optimizer run tests/hf_train_script.py --optim ano --output_dir OUT ...``, the
registry's names become valid ``--optim`` choices. It trains a tiny GPT-2 (built from a config)
on a synthetic, learnable token sequence and writes ``OUT/optimizer_report.json``: the optimizer
class, its parameter groups' hyper-parameters and names, transformers' own decay-parameter names,
and the loss before and after training.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments


@dataclass
class DataArguments:
    num_samples: int = field(default=16, metadata={"help": "synthetic training sequences"})
    seq_len: int = field(default=16, metadata={"help": "tokens per sequence"})


class CountingSequences(torch.utils.data.Dataset):
    """Sequences that count up by 3 modulo the vocabulary: the next token is always predictable."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int) -> None:
        starts = torch.arange(num_samples) * 7
        self.ids = (starts[:, None] + 3 * torch.arange(seq_len)[None, :]) % vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> int:
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses()

    torch.manual_seed(training_args.seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    dataset = CountingSequences(data_args.num_samples, data_args.seq_len, config.vocab_size)

    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    loss_before = trainer.evaluate(dataset)["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate(dataset)["eval_loss"]

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "param_names": sorted(names[id(p)] for p in group["params"]),
        }
        for group in optimizer.param_groups
    ]
    report = {
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "groups": groups,
        "decay_parameter_names": sorted(
            n for n, _ in model.named_parameters() if n in trainer.get_decay_parameter_names(model)
        ),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "argv": sys.argv,
        "world_size": training_args.world_size,
        "main_module": __name__,
        "sys_path0": sys.path[0],
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "optimizer_report.json"), "w") as f:
            json.dump(report, f, indent=2, default=repr)
    print(f"loss {loss_before:.4f} -> {loss_after:.4f} with {report['optimizer_class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
