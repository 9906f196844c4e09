"""What narrower optimizer state costs in quality: float32, bfloat16 and 8-bit moments.

    python -m benchmarks.state_quality [--seeds 0 1 2] [--threads 2]

Two small tasks, each trained with the same seeds and data order for every row: Ano with
float32, bfloat16 and 8-bit (``state_dtype=torch.uint8``) state, and as the 8-bit baseline
``torch.optim.AdamW`` against torchao's ``AdamW8bit`` (where torchao imports; its step is
``torch.compile``d, about 15 s on the first step here):

- digits: the demo's MLP on scikit-learn's digits (``ano_optimizer.demo.data``), 20 epochs,
  batch 64, lr 1e-3; final training loss and test accuracy;
- transformer: a 2-layer causal Transformer (d_model 64) learning the next token of sequences
  drawn from a fixed random Markov chain (vocabulary 32), 300 steps of batch 32, lr 1e-3 with
  betas (0.9, 0.999) (where round-to-nearest state would drift); held-out loss and accuracy.

Prints a Markdown table: mean ± std over seeds per row, and the mean per-seed gap of each
narrower state to its optimizer's float32 state.
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


def _torchao_adamw8bit():
    try:
        from torchao.optim import AdamW8bit
    except Exception:  # not installed, or not for this torch
        return None
    return AdamW8bit


ROWS = {
    "Ano, float32 state": lambda ps, betas: Ano(ps, lr=1e-3, betas=betas),
    "Ano, bfloat16 state": lambda ps, betas: Ano(
        ps, lr=1e-3, betas=betas, state_dtype=torch.bfloat16
    ),
    "Ano, 8-bit state": lambda ps, betas: Ano(ps, lr=1e-3, betas=betas, state_dtype=torch.uint8),
    "AdamW": lambda ps, betas: torch.optim.AdamW(ps, lr=1e-3, betas=betas),
    "torchao AdamW8bit": lambda ps, betas: _torchao_adamw8bit()(ps, lr=1e-3, betas=betas),
}
# Each narrower state, and the float32 row it is compared with.
GAPS = {
    "Ano, bfloat16 state": "Ano, float32 state",
    "Ano, 8-bit state": "Ano, float32 state",
    "torchao AdamW8bit": "AdamW",
}


def digits_run(seed: int, make) -> tuple[float, float]:
    data = load_digits()
    torch.manual_seed(seed)
    model = data.make_model()
    optimizer = make(model.parameters(), (0.92, 0.99))
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


def transformer_run(seed: int, make) -> tuple[float, float]:
    batches, (x_val, y_val) = markov_batches(300, 32, seed=seed)
    torch.manual_seed(seed)
    model = TinyCausalTransformer()
    optimizer = make(model.parameters(), (0.9, 0.999))
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
    rows = {k: v for k, v in ROWS.items() if k != "torchao AdamW8bit" or _torchao_adamw8bit()}
    lines = [
        "| task | metric | " + " | ".join(rows) + " | "
        + " | ".join(f"gap: {k}" for k in GAPS if k in rows) + " |",
        "|---|---|" + "---:|" * (len(rows) + sum(k in rows for k in GAPS)),
    ]  # fmt: skip
    for task, run, metrics in (
        ("digits MLP", digits_run, ("train loss", "test accuracy")),
        ("tiny Transformer", transformer_run, ("held-out loss", "held-out accuracy")),
    ):
        results = {label: [] for label in rows}
        for seed in args.seeds:
            for label, make in rows.items():
                start = time.perf_counter()
                results[label].append(run(seed, make))
                print(
                    f"{task} seed {seed} {label}: {results[label][-1]} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        for i, metric in enumerate(metrics):
            cells = []
            for label in rows:
                mean, std = _mean_std([r[i] for r in results[label]])
                cells.append(f"{mean:.4f} ± {std:.4f}")
            for narrow, full in GAPS.items():
                if narrow in rows:
                    gap = statistics.mean(
                        a[i] - b[i] for a, b in zip(results[narrow], results[full], strict=True)
                    )
                    cells.append(f"{gap:+.4f}")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
