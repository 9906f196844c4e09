"""Parameter sets used by the benchmarks: real model shapes, fp32."""

from __future__ import annotations


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25.6 M parameters)."""
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024):
    """The 148 parameter tensors of GPT-2 small (124.4 M parameters, tied output embedding)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]  # ln_1
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,)]  # attention
        shapes += [(width,), (width,)]  # ln_2
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # MLP
    shapes += [(width,), (width,)]  # ln_f
    return shapes


PARAMETER_SETS = {"resnet50": resnet50_shapes, "gpt2-small": gpt2_small_shapes}
