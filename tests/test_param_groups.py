"""Weight-decay parameter groups on real models, checked against timm's own function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ano_optimizer import Ano, param_groups_weight_decay


def names_by_decay(groups) -> dict[float, list[str]]:
    return {group["weight_decay"]: group["param_names"] for group in groups}


class TinyTransformer(nn.Module):
    """Token and position embeddings, one encoder layer (LayerNorms inside), a tied head."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(1, 6, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=16, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: one parameter, listed once

    def no_weight_decay(self):
        return {"positions"}

    def forward(self, ids):
        return self.head(self.norm(self.encoder(self.tokens(ids) + self.positions)))


def test_transformer_layernorm_embeddings_and_no_weight_decay():
    model = TinyTransformer()
    groups = param_groups_weight_decay(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.1]
    by_decay = names_by_decay(groups)
    assert by_decay[0.1] == [
        "tokens.weight",
        "encoder.self_attn.in_proj_weight",
        "encoder.self_attn.out_proj.weight",
        "encoder.linear1.weight",
        "encoder.linear2.weight",
    ]
    assert by_decay[0.0] == [
        "positions",  # 3-D, kept out by model.no_weight_decay()
        "encoder.self_attn.in_proj_bias",  # 1-D
        "encoder.self_attn.out_proj.bias",
        "encoder.linear1.bias",
        "encoder.linear2.bias",
        "encoder.norm1.weight",
        "encoder.norm1.bias",
        "encoder.norm2.weight",
        "encoder.norm2.bias",
        "norm.weight",
        "norm.bias",
    ]
    for group in groups:
        named = dict(model.named_parameters())
        assert all(
            p is named[n] for n, p in zip(group["param_names"], group["params"], strict=True)
        )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_wildcards_bias_suffix_and_user_patterns():
    class LayerScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            for block in self.blocks:
                block.gamma = nn.Parameter(torch.ones(4, 1))  # 2-D, not a bias
            # 2-D but named like a bias: excluded by the ".bias" rule, not by ndim.
            self.proj = nn.Module()
            self.proj.bias = nn.Parameter(torch.zeros(2, 4))

        def no_weight_decay(self):
            return ["blocks.*.gamma"]

    model = LayerScaled()
    by_decay = names_by_decay(param_groups_weight_decay(model, 0.05))
    assert by_decay[0.05] == ["blocks.0.weight", "blocks.1.weight"]
    assert set(by_decay[0.0]) == {
        "blocks.0.bias",
        "blocks.0.gamma",
        "blocks.1.bias",
        "blocks.1.gamma",
        "proj.bias",
    }
    # A user pattern (a single string is one pattern) moves blocks.1.weight out of decay too.
    by_decay = names_by_decay(param_groups_weight_decay(model, 0.05, "blocks.1.w*"))
    assert by_decay[0.05] == ["blocks.0.weight"]


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    by_decay = names_by_decay(param_groups_weight_decay(model, 0.1))
    assert by_decay == {0.0: ["1.bias"], 0.1: ["1.weight"]}

    model[1].weight.requires_grad_(False)
    assert names_by_decay(param_groups_weight_decay(model, 0.1)) == {0.0: ["1.bias"]}
    model[1].bias.requires_grad_(False)
    assert param_groups_weight_decay(model, 0.1) == []


def test_zero_weight_decay_is_one_group():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = param_groups_weight_decay(model, 0.0)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 0.0
    assert groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="invalid weight_decay=-1"):
        param_groups_weight_decay(model, -1)
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        param_groups_weight_decay(list(model.parameters()), 0.1)
    with pytest.raises(TypeError, match="patterns must be strings, got 3"):
        param_groups_weight_decay(model, 0.1, [3])


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_same_split_as_timm_on_a_vision_transformer(weight_decay):
    import timm
    from timm.optim import param_groups_weight_decay as timm_groups

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    model.blocks[0].requires_grad_(False)  # frozen parameters: left out by both
    ours = param_groups_weight_decay(model, weight_decay)
    theirs = timm_groups(model, weight_decay, no_weight_decay_list=model.no_weight_decay())
    assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in ours] == [
        (g["weight_decay"], [id(p) for p in g["params"]]) for g in theirs
    ]
    if weight_decay:
        assert {"pos_embed", "cls_token"} <= set(ours[0]["param_names"])


def test_ano_keeps_param_names_through_state_dict():
    model = TinyTransformer()
    optimizer = Ano(param_groups_weight_decay(model, 0.1), lr=1e-2)
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert state["param_groups"][1]["param_names"][0] == "tokens.weight"
    assert state["param_groups"][1]["weight_decay"] == 0.1

    twin = Ano(param_groups_weight_decay(TinyTransformer(), 0.1), lr=1e-2)
    twin.load_state_dict(state)
    assert [g["param_names"] for g in twin.param_groups] == [
        g["param_names"] for g in optimizer.param_groups
    ]
