"""What bfloat16 optimizer state costs in quality: float32 vs bfloat16 ``exp_avg``/``exp_avg_sq``.

    python -m benchmarks.fused_bf16_quality [--seeds 0 1 2] [--threads 2]

Two small tasks, each trained with the same seeds and data order under both state dtypes:

- digits: the demo's MLP on scikit-learn's digits (``ano_optimizer.demo.data``), 20 epochs,
  batch 64, Ano lr 1e-3; final training loss and test accuracy;
- transformer: a 2-layer causal Transformer (d_model 64) learning the next token of sequences
  drawn from a fixed random Markov chain (vocabulary 32), 300 steps of batch 32, Ano lr 1e-3
  with beta2 = 0.999 (where round-to-nearest state would drift); held-out loss and accuracy.

Prints a Markdown table: mean ± std over seeds per state dtype, and the per-seed gap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from ano_optimizer import Ano
from ano_optimizer.demo.data import load_digits


def digits_run(seed: int, state_dtype) -> tuple[float, float]:
    data = load_digits()
    torch.manual_seed(seed)
    model = data.make_model()
    optimizer = Ano(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        order = torch.randperm(len(data.y_train), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(data.x_train), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return train_loss, accuracy


class TinyCausalTransformer(nn.Module):
    def __init__(self, vocab=32, width=64, layers=2, context=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens):
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def markov_batches(steps: int, batch: int, context: int = 32, vocab: int = 32, seed: int = 0):
    """Sequences from one fixed random Markov chain (the task), in an order set by ``seed``."""
    chain_gen = torch.Generator().manual_seed(1234)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=chain_gen), dim=1)
    gen = torch.Generator().manual_seed(seed)

    def sample(n):
        tokens = torch.empty(n, context + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
        for t in range(context):
            tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=gen)[:, 0]
        return tokens[:, :-1], tokens[:, 1:]

    return [sample(batch) for _ in range(steps)], sample(256)


def transformer_run(seed: int, state_dtype) -> tuple[float, float]:
    batches, (x_val, y_val) = markov_batches(300, 32, seed=seed)
    torch.manual_seed(seed)
    model = TinyCausalTransformer()
    optimizer = Ano(model.parameters(), lr=1e-3, betas=(0.9, 0.999), state_dtype=state_dtype)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x_val)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y_val.flatten()).item()
        accuracy = (logits.argmax(-1) == y_val).float().mean().item()
    return loss, accuracy


def _mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "| task | metric | float32 state | bfloat16 state | mean gap (bf16 − fp32) |",
        "|---|---|---:|---:|---:|",
    ]
    for task, run, metrics in (
        ("digits MLP", digits_run, ("train loss", "test accuracy")),
        ("tiny Transformer", transformer_run, ("held-out loss", "held-out accuracy")),
    ):
        results = {torch.float32: [], torch.bfloat16: []}
        for seed in args.seeds:
            for dtype in results:
                start = time.perf_counter()
                results[dtype].append(run(seed, dtype))
                print(
                    f"{task} seed {seed} {dtype}: {results[dtype][-1]} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        for i, metric in enumerate(metrics):
            full = [r[i] for r in results[torch.float32]]
            half = [r[i] for r in results[torch.bfloat16]]
            gap = statistics.mean(h - f for h, f in zip(half, full, strict=True))
            (fm, fs), (hm, hs) = _mean_std(full), _mean_std(half)
            lines.append(
                f"| {task} | {metric} | {fm:.4f} ± {fs:.4f} | {hm:.4f} ± {hs:.4f} | {gap:+.4f} |"
            )
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
