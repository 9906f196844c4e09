"""timm integration: registry optimizers through timm's own factory, groups, schedulers, train.py.

Everything runs real timm code on real timm models built with ``pretrained=False`` (no download):
``test_resnet`` and ``test_vit`` (timm's tiny test architectures; the ViT at ``img_size=32``,
whose ``no_weight_decay()`` names ``pos_embed`` and ``cls_token``). The optimizer is built the
way timm's ``train.py`` builds it: ``create_optimizer_v2(model, **optimizer_kwargs(cfg=args),
**args.opt_kwargs)`` on an argparse namespace with train.py's option names.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import timm.optim
import torch
from ano_optimizer.integrations import timm as ano_timm
from timm.models import resume_checkpoint
from timm.optim import _optim_factory as timm_optim_factory
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.optim.lookahead import Lookahead
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from ano_optimizer import Ano, Anolog, get_optimizer_spec, list_optimizers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: on a shared, busy CPU, one thread beats several spinning ones by 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_args(**options) -> argparse.Namespace:
    """The optimizer/scheduler options of timm's train.py, at train.py's defaults."""
    args = argparse.Namespace(
        opt="sgd",
        opt_eps=None,
        opt_betas=None,
        momentum=0.9,
        weight_decay=2e-5,
        layer_decay=None,
        opt_kwargs={},
        lr=None,
        sched="cosine",
        sched_on_updates=False,
        epochs=300,
        warmup_epochs=5,
        warmup_lr=1e-5,
        min_lr=0.0,
        decay_epochs=90,
        cooldown_epochs=0,
    )
    for key, value in options.items():
        if not hasattr(args, key):
            raise AttributeError(f"train.py has no option {key!r}")
        setattr(args, key, value)
    return args


def train_py_optimizer(model, args):
    # The exact call of timm's train.py.
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)


def resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=4)


def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)


def batch(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return images, labels


def loss_and_backward(model, optimizer, images, labels):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.item()


def group_signature(optimizer):
    return [
        (
            [id(p) for p in group["params"]],
            group["weight_decay"],
            group.get("lr_scale"),
            group["lr"],
        )
        for group in optimizer.param_groups
    ]


# --- registration --------------------------------------------------------------------------


def test_every_registry_torch_optimizer_is_in_timm_with_its_spec():
    names = ano_timm.register()
    assert names == list_optimizers(framework="torch")
    for name in names:
        spec = get_optimizer_spec(name)
        info = timm.optim.get_optimizer_info(name)
        assert info.description == spec.description
        assert (info.has_betas, info.has_eps, info.has_momentum) == (
            spec.has_betas,
            spec.has_eps,
            spec.has_momentum,
        )
        assert (info.defaults or {}) == dict(spec.defaults)
        qualname = spec.torch_class.partition(":")[2]
        assert timm.optim.get_optimizer_class(name, bind_defaults=False).__qualname__ == qualname
        assert name in timm.optim.list_optimizers()
    assert ("ano", get_optimizer_spec("ano").description) in timm.optim.list_optimizers(
        "ano*", with_description=True
    )
    assert timm.optim.get_optimizer_class("anolog", bind_defaults=False) is Anolog


def test_registration_is_idempotent():
    first = ano_timm.register()
    infos = {name: timm.optim.get_optimizer_info(name) for name in first}
    timm_names = timm.optim.list_optimizers()
    assert ano_timm.register() == first
    assert timm.optim.list_optimizers() == timm_names
    for name in first:
        assert timm.optim.get_optimizer_info(name) is infos[name]
    # A fresh copy of the module (its own bookkeeping empty) recognises its entries too.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(ano_timm)
    assert ano_timm.register() == first
    for name in first:
        assert timm.optim.get_optimizer_info(name) is infos[name]


def test_missing_private_timm_registry_is_a_clear_error(monkeypatch):
    # What a timm release that moved or removed its private registry looks like to us.
    monkeypatch.delattr(timm_optim_factory, "default_registry")
    with pytest.raises(RuntimeError, match=f"timm {timm.__version__} has no usable"):
        ano_timm.register()


# --- hyper-parameters as train.py passes them ------------------------------------------------


def test_train_py_options_reach_the_optimizer():
    model = resnet()
    args = train_args(
        opt="ano",
        lr=3e-3,
        opt_betas=[0.9, 0.995],  # --opt-betas 0.9 0.995 parses to a list
        opt_eps=1e-7,
        weight_decay=0.05,
        opt_kwargs={"logarithmic_schedule": True},  # --opt-kwargs logarithmic_schedule=True
    )
    optimizer = train_py_optimizer(model, args)
    assert type(optimizer) is Ano
    assert optimizer.defaults["weight_decay"] == 0.0  # timm moved it into the groups
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.995)
        assert type(group["betas"]) is tuple and all(type(b) is float for b in group["betas"])
        assert group["eps"] == 1e-7
        assert group["lr"] == 3e-3
        assert group["logarithmic_schedule"] is True
    # train.py always passes --momentum (0.9); a spec without has_momentum never receives it.
    assert "momentum" not in optimizer.defaults

    anolog = train_py_optimizer(model, train_args(opt="anolog", lr=1e-3))
    assert type(anolog) is Anolog
    assert all(group["logarithmic_schedule"] for group in anolog.param_groups)
    # Without --opt-betas/--opt-eps the class defaults stay.
    class_defaults = Anolog([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert anolog.param_groups[0]["betas"] == class_defaults["betas"]
    assert anolog.param_groups[0]["eps"] == class_defaults["eps"]


def test_bad_train_py_options_are_errors_not_dropped():
    model = resnet()
    with pytest.raises(TypeError, match="nesterov"):
        train_py_optimizer(model, train_args(opt="ano", lr=1e-3, opt_kwargs={"nesterov": True}))
    with pytest.raises(ValueError, match="betas"):
        train_py_optimizer(model, train_args(opt="ano", lr=1e-3, opt_betas=[0.9]))
    with pytest.raises(ValueError, match=r"beta2=0\.3"):
        train_py_optimizer(model, train_args(opt="ano", lr=1e-3, opt_betas=[0.9, 0.3]))


# --- parameter groups ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_model, options",
    [
        (resnet, {"weight_decay": 0.05}),
        (resnet, {"weight_decay": 0.05, "filter_bias_and_bn": False}),
        (resnet, {"weight_decay": 0.0}),
        (vit, {"weight_decay": 0.05}),
        (vit, {"weight_decay": 0.05, "layer_decay": 0.75}),
        (vit, {"weight_decay": 0.05, "layer_decay": 0.75, "filter_bias_and_bn": False}),
    ],
    ids=["resnet", "resnet-no-filter", "resnet-no-wd", "vit", "vit-layer-decay", "vit-ld-nofilter"],
)
def test_param_groups_equal_timm_adamw(make_model, options):
    model = make_model()
    reference = create_optimizer_v2(model, opt="adamw", lr=1e-3, **options)
    for name in ano_timm.register():
        optimizer = create_optimizer_v2(model, opt=name, lr=1e-3, **options)
        assert group_signature(optimizer) == group_signature(reference)
        extra_keys = {k for g in reference.param_groups for k in g} - set(reference.defaults)
        for ours, theirs in zip(optimizer.param_groups, reference.param_groups, strict=True):
            assert {k: ours[k] for k in extra_keys if k in theirs} == {
                k: theirs[k] for k in extra_keys if k in theirs
            }


def test_vit_no_weight_decay_and_layer_decay_groups():
    model = vit()
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    optimizer = create_optimizer_v2(model, opt="ano", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert group_of[id(model.get_parameter(name))]["weight_decay"] == 0.0, name
    assert group_of[id(model.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.05
    scales = {
        name: group_of[id(model.get_parameter(name))]["lr_scale"]
        for name in (
            "pos_embed",
            "blocks.0.mlp.fc1.weight",
            "blocks.5.mlp.fc1.weight",
            "head.weight",
        )
    }
    depth = len(model.blocks) + 1  # stem, one layer per block, then the head at scale 1
    assert scales == pytest.approx(
        {
            "pos_embed": 0.75**depth,
            "blocks.0.mlp.fc1.weight": 0.75 ** (depth - 1),
            "blocks.5.mlp.fc1.weight": 0.75 ** (depth - 6),
            "head.weight": 1.0,
        }
    )


def test_scheduler_lr_scale_and_weight_decay_reach_the_update():
    """First Ano step: p1 = p0 (1 - lr wd) - lr g / (|g| + eps), per group, after timm's scheduler."""
    model = vit()
    args = train_args(
        opt="ano", lr=1e-2, weight_decay=0.05, layer_decay=0.75, epochs=4, warmup_epochs=1,
        warmup_lr=1e-3,
    )  # fmt: skip
    optimizer = train_py_optimizer(model, args)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    scheduler.step(1)  # past warmup: base lr x lr_scale, cosine at epoch 1 of 4
    expected_base = 1e-2 * 0.5 * (1 + math.cos(math.pi / 4))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected_base * group["lr_scale"], rel=1e-12)

    before = {p: p.detach().double().clone() for p in model.parameters()}
    loss_and_backward(model, optimizer, *batch())
    grads = {p: p.grad.double().clone() for p in model.parameters()}
    optimizer.step()
    for group in optimizer.param_groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            g = grads[p]
            expected = before[p] * (1 - lr * wd) - lr * g / (g.abs() + eps)
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


# --- training ----------------------------------------------------------------------------------


def test_training_lowers_the_loss_under_a_timm_scheduler():
    model = resnet()
    images, labels = batch(n=8)
    args = train_args(
        opt="anolog", lr=3e-3, weight_decay=0.01, epochs=4, warmup_epochs=1, warmup_lr=3e-4,
        sched_on_updates=True,
    )  # fmt: skip
    optimizer = train_py_optimizer(model, args)
    updates_per_epoch = 3
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    losses, lrs, num_updates = [], [], 0
    for epoch in range(num_epochs):
        for _ in range(updates_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            losses.append(loss_and_backward(model, optimizer, images, labels))
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        scheduler.step(epoch + 1)
    model.eval()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(images), labels).item()
    # timm's per-update schedule: linear warmup over 3 updates, then cosine over 12.
    expected = [
        3e-4 + t * (3e-3 - 3e-4) / 3 if t < 3 else 0.5 * 3e-3 * (1 + math.cos(math.pi * t / 12))
        for t in range(12)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert losses[-1] < 0.5 * losses[0], losses
    assert final < losses[0]


def test_lookahead_ano_matches_ano_then_the_slow_weights():
    # timm's Lookahead (k=6, alpha=0.5) starts its slow weights at the first sync (step 6), so
    # after 12 steps: p = p6 + 0.5 * (fast12 - p6), where fast follows plain Ano from p6.
    model = vit()
    twin = copy.deepcopy(model)
    images, labels = batch()
    lookahead = create_optimizer_v2(model, opt="lookahead_ano", lr=1e-3, weight_decay=0.05)
    plain = create_optimizer_v2(twin, opt="ano", lr=1e-3, weight_decay=0.05)
    assert type(lookahead) is Lookahead and type(lookahead._base_optimizer) is Ano
    for _ in range(6):
        loss_and_backward(model, lookahead, images, labels)
        lookahead.step()
        loss_and_backward(twin, plain, images, labels)
        plain.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    at_sync = [p.detach().clone() for p in model.parameters()]
    for _ in range(6):
        loss_and_backward(model, lookahead, images, labels)
        lookahead.step()
        loss_and_backward(twin, plain, images, labels)
        plain.step()
    for p, p6, fast in zip(model.parameters(), at_sync, twin.parameters(), strict=True):
        torch.testing.assert_close(p, p6 + 0.5 * (fast - p6))
    moved = [
        not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True)
    ]
    assert any(moved)


def _resume_is_exact(opt_name, tmp_path, steps=3):
    images, labels = batch()
    args = train_args(opt=opt_name, lr=1e-3, weight_decay=0.05, opt_betas=[0.9, 0.99])
    model = vit()
    optimizer = train_py_optimizer(model, args)
    for _ in range(steps):
        loss_and_backward(model, optimizer, images, labels)
        optimizer.step()
    # The keys timm's CheckpointSaver writes; resumed through timm's own resume_checkpoint.
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 0,
            "arch": "test_vit",
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
        },
        path,
    )
    resumed_model = vit()
    resumed = train_py_optimizer(resumed_model, args)
    assert resume_checkpoint(resumed_model, str(path), optimizer=resumed, log_info=False) == 1
    for _ in range(steps):
        for m, o in ((model, optimizer), (resumed_model, resumed)):
            loss_and_backward(m, o, images, labels)
            o.step()
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_from_a_timm_checkpoint_is_exact(tmp_path):
    _resume_is_exact("ano", tmp_path)


def test_resume_lookahead_ano_from_a_timm_checkpoint_is_exact(tmp_path):
    # Lookahead syncs (and creates its slow buffers) every 6 steps: save after the first sync,
    # resume across the second.
    _resume_is_exact("lookahead_ano", tmp_path, steps=7)


# --- in a fresh process: train.py's --device-modules, then plugins ----------------------------
# One interpreter for both (starting one costs seconds): the train.py part must run first, while
# nothing has imported the integration yet.

TRAIN_PY = textwrap.dedent(
    """
    import argparse, importlib, json, sys
    import torch, timm
    import timm.optim
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ParseKwargs

    # The options of timm's train.py that reach the optimizer and the scheduler, as it declares them.
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", metavar="DIR")
    parser.add_argument("--model", default="resnet50", type=str)
    parser.add_argument("--device-modules", default=None, type=str, nargs="+")
    parser.add_argument("--opt", default="sgd", type=str)
    parser.add_argument("--opt-eps", default=None, type=float)
    parser.add_argument("--opt-betas", default=None, type=float, nargs="+")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=2e-5)
    parser.add_argument("--layer-decay", type=float, default=None)
    parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
    parser.add_argument("--sched", type=str, default="cosine")
    parser.add_argument("--sched-on-updates", action="store_true", default=False)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-lr", type=float, default=1e-5)
    parser.add_argument("--min-lr", type=float, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    args = parser.parse_args(sys.argv[1:])

    known_before = "ano" in timm.optim.list_optimizers()
    # What train.py's main() does first with --device-modules.
    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=4)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    updates_per_epoch = 2
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 4, (args.batch_size,), generator=generator)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses, lrs, num_updates = [], [], 0
    for epoch in range(num_epochs):
        for _ in range(updates_per_epoch):
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            lr_scheduler.step_update(num_updates=num_updates, metric=loss.item())
            losses.append(loss.item())
        lr_scheduler.step(epoch + 1)
        lrs.append(optimizer.param_groups[0]["lr"])
    RESULT = {"train": {
        "known_before": known_before,
        "class": type(optimizer).__module__ + "." + type(optimizer).__qualname__,
        "group": {k: v for k, v in optimizer.param_groups[0].items() if k != "params"},
        "weight_decays": sorted({g["weight_decay"] for g in optimizer.param_groups}),
        "losses": losses,
        "lrs": lrs,
    }}
    """
)

PLUGINS = textwrap.dedent(
    """
    import warnings
    from ano_optimizer import OptimizerSpec, register_optimizer
    from ano_optimizer.integrations import timm as ano_timm

    # Plugins as a third-party distribution would declare them: a new name, a name timm owns,
    # and (registered later) a momentum optimizer without betas/eps.
    register_optimizer(OptimizerSpec(
        name="anowarm", description="Ano with the paper's vision betas",
        torch_class="ano_optimizer.optimizer:Ano", keras_class=None,
        defaults={"betas": (0.95, 0.995)}, source="vision-plugin"))
    register_optimizer(OptimizerSpec(
        name="lion", description="not timm's Lion",
        torch_class="ano_optimizer.optimizer:Ano", keras_class=None, source="clash-plugin"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ano_timm.register()
    register_optimizer(OptimizerSpec(
        name="sgdplain", description="torch SGD, momentum only",
        torch_class="torch.optim:SGD", keras_class=None,
        has_betas=False, has_eps=False, has_momentum=True, source="sgd-plugin"))
    class Holder:  # a class timm's "module.Class" strings cannot name: resolved at registration
        class SGD(torch.optim.SGD):
            pass
    register_optimizer(OptimizerSpec(
        name="nestedsgd", description="a nested class", torch_class="__main__:Holder.SGD",
        keras_class=None, has_betas=False, has_eps=False, has_momentum=True))
    with warnings.catch_warnings(record=True) as caught_again:
        warnings.simplefilter("always")
        second = ano_timm.register()

    model = torch.nn.Linear(3, 2)
    warm = create_optimizer_v2(model, opt="anowarm", lr=1e-3)
    warm_override = create_optimizer_v2(model, opt="anowarm", lr=1e-3, betas=[0.8, 0.9])
    lion = create_optimizer_v2(model, opt="lion", lr=1e-3)
    # train.py passes momentum, betas and eps whatever the optimizer: timm keeps what the spec accepts.
    sgd = create_optimizer_v2(model, opt="sgdplain", lr=0.1, momentum=0.8, betas=[0.9, 0.99], eps=1e-6)
    nested = create_optimizer_v2(model, opt="nestedsgd", lr=0.1)
    RESULT["plugins"] = {
        "first": first, "second": second,
        "warnings": [(w.category.__name__, str(w.message)) for w in caught],
        "warnings_again": [str(w.message) for w in caught_again],
        "in_timm": [n for n in ("anowarm", "lion", "sgdplain") if n in timm.optim.list_optimizers()],
        "warm": [type(warm).__name__, list(warm.param_groups[0]["betas"])],
        "warm_override": list(warm_override.param_groups[0]["betas"]),
        "lion": type(lion).__module__ + "." + type(lion).__qualname__,
        "sgd": [type(sgd).__name__, sgd.param_groups[0]["momentum"], sgd.param_groups[0]["lr"]],
        "nested": [type(nested).__qualname__, nested.param_groups[0]["momentum"]],
    }
    print(json.dumps(RESULT))
    """
)

TRAIN_PY_ARGV = [
    "DATA",
    "--model", "test_resnet",
    "--opt", "ano",
    "--opt-betas", "0.9", "0.99",
    "--opt-eps", "1e-8",
    "--weight-decay", "0.05",
    "--opt-kwargs", "logarithmic_schedule=True",
    "--lr", "3e-3",
    "--warmup-lr", "3e-4",
    "--epochs", "3",
    "--warmup-epochs", "1",
    "-b", "8",
    "--device-modules", "ano_optimizer.integrations.timm",
]  # fmt: skip


@pytest.fixture(scope="module")
def fresh_process():
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_PY + PLUGINS, *TRAIN_PY_ARGV],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_py_command_line_with_device_modules(fresh_process):
    out = fresh_process["train"]
    assert out["known_before"] is False  # importing the --device-modules module registered it
    assert out["class"] == "ano_optimizer.optimizer.Ano"
    assert out["group"]["betas"] == [0.9, 0.99]
    assert out["group"]["eps"] == 1e-8
    assert out["group"]["logarithmic_schedule"] is True
    assert out["weight_decays"] == [0.0, 0.05]
    # Per epoch: warmup over, then cosine over 3 epochs.
    assert out["lrs"][:2] == pytest.approx(
        [0.5 * 3e-3 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2)]
    )
    assert out["losses"][-1] < out["losses"][0], out["losses"]


def test_plugin_names_reach_timm_and_timm_names_are_never_replaced(fresh_process):
    out = fresh_process["plugins"]
    assert "anowarm" in out["first"] and "lion" not in out["first"]
    assert out["second"] == sorted([*out["first"], "nestedsgd", "sgdplain"])
    assert out["in_timm"] == ["anowarm", "lion", "sgdplain"]
    assert out["warm"] == ["Ano", [0.95, 0.995]]  # the spec's defaults
    assert out["warm_override"] == [0.8, 0.9]  # the caller wins
    assert out["lion"] == "timm.optim.lion.Lion"
    assert out["sgd"] == ["SGD", 0.8, 0.1]
    assert out["nested"] == ["Holder.SGD", 0.9]  # timm's default momentum for has_momentum
    taken = [m for c, m in out["warnings"] if c == "TimmNameTakenWarning"]
    assert len(taken) == 1 and "'lion'" in taken[0] and "clash-plugin" in taken[0]
    assert out["warnings_again"] == []  # warned once per name, registration idempotent


@pytest.mark.slow
def test_train_py_through_the_launcher_with_an_installed_plugin(tmp_path):
    """``ano-optimizer run train.py --opt signsgd``: no --device-modules, a momentum-only plugin."""
    from plugin_fixture import PLUGIN_NAME, env_with_path, module_name, write_plugin

    script = tmp_path / "train.py"
    script.write_text(TRAIN_PY + "print(json.dumps(RESULT))\n")
    argv = [
        "DATA",
        "--model", "test_resnet",
        "--opt", PLUGIN_NAME,
        "--momentum", "0.8",
        "--opt-betas", "0.9", "0.99",  # timm drops these: the spec has neither betas nor eps
        "--opt-eps", "1e-6",
        "--weight-decay", "0.01",
        "--lr", "3e-3",
        "--warmup-epochs", "0",
        "--epochs", "3",
        "-b", "8",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "ano_optimizer.cli", "run", str(script), *argv],
        cwd=REPO_ROOT,
        env=env_with_path(write_plugin(tmp_path / "plugin"), OMP_NUM_THREADS=1),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])["train"]
    assert out["known_before"] is True  # the launcher registered every integration first
    assert out["class"] == f"{module_name('ano-fixture-plugin')}.torch_impl.SignSGD"
    assert out["group"]["momentum"] == 0.8  # train.py's --momentum, kept for has_momentum
    assert out["weight_decays"] == [0.0, 0.01]
    assert "betas" not in out["group"] and "eps" not in out["group"]
    assert out["losses"][-1] < out["losses"][0], out["losses"]


# timm's own optimizer tests (tests/test_optim.py: test_optim_factory, test_optimizer_convergence)
# state what every optimizer in its factory must do; the same checks, for the registry's names.
def _timm_quadratic(optimizer, weight, bias, x):
    optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def _timm_state_dict_contract(make):
    torch.manual_seed(0)
    weight, bias, x = (torch.nn.Parameter(torch.randn(*s)) for s in ((10, 5), (10,), (5,)))
    optimizer = make(weight, bias)
    step = functools.partial(_timm_quadratic, optimizer, weight, bias, x)
    for _ in range(20):
        optimizer.step(step)
    with torch.no_grad():
        weight_c, bias_c = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
    optimizer_c = make(weight_c, bias_c)
    step_c = functools.partial(_timm_quadratic, optimizer_c, weight_c, bias_c, x)
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(20):
        optimizer.step(step)
        optimizer_c.step(step_c)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    ours, theirs = optimizer.state_dict(), optimizer_c.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]  # deterministic, keys included
    torch.testing.assert_close(ours["state"], theirs["state"])
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert (
        optimizer.state_dict()["param_groups"][-1] == optimizer_c.state_dict()["param_groups"][-1]
    )

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(optimizer) == public(copy.deepcopy(optimizer))
    # Loaded into float64 parameters: the state follows the parameters, values intact, and the
    # updates point the same way.
    with torch.no_grad():
        params64 = [torch.nn.Parameter(p.double()) for p in (weight, bias, x)]
    optimizer64 = make(*params64[:2])
    saved = copy.deepcopy(optimizer.state_dict())
    given = copy.deepcopy(saved)
    optimizer64.load_state_dict(given)
    assert given["param_groups"] == saved["param_groups"]
    torch.testing.assert_close(given["state"], saved["state"])
    index = {p: i for i, p in enumerate(p for g in optimizer64.param_groups for p in g["params"])}
    for param, state in optimizer64.state.items():
        for key, value in state.items():
            source = saved["state"][index[param]][key]
            if value.dim() and value.is_floating_point():
                assert value.dtype in (param.dtype, source.dtype), key
            assert torch.equal(value.to("cpu", source.dtype), source), key
    start, start64 = [p.clone() for p in (weight, bias)], [p.clone() for p in params64[:2]]
    step64 = functools.partial(_timm_quadratic, optimizer64, *params64)
    for _ in range(5):
        optimizer.step(step)
        optimizer64.step(step64)
    with torch.no_grad():
        delta = torch.cat([(p - s).flatten() for p, s in zip((weight, bias), start, strict=True)])
        delta64 = torch.cat([(p - s).flatten() for p, s in zip(params64[:2], start64, strict=True)])
    assert torch.nn.functional.cosine_similarity(delta, delta64.float(), dim=0) > 0.9


def _timm_lowers_the_loss(make, non_contiguous):
    torch.manual_seed(1)
    if non_contiguous:
        weight = torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0])
        bias = torch.nn.Parameter(torch.randn(10, 2)[..., 0])
    else:
        weight, bias = torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(10))
    x = torch.nn.Parameter(torch.randn(5))
    optimizer = make(weight, bias)
    repr(optimizer)
    step = functools.partial(_timm_quadratic, optimizer, weight, bias, x)
    initial = step().item()
    for _ in range(200):
        optimizer.step(step)
    assert step().item() < initial


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ano", "anolog", "lookahead_ano"])
def test_timm_optim_factory_contract(name):
    ano_timm.register()
    if not name.startswith("lookahead_"):  # timm resolves lookahead_* in its factory only
        cls = timm.optim.get_optimizer_class(name, bind_defaults=False)
        assert issubclass(cls, torch.optim.Optimizer)
        assert isinstance(timm.optim.get_optimizer_info(name), timm.optim.OptimInfo)
    lr = 1e-2
    makers = [
        lambda w, b: create_optimizer_v2([w, b], name, lr=lr),
        lambda w, b: create_optimizer_v2(
            [{"params": [w]}, {"params": [b], "lr": lr}], name, lr=lr / 10
        ),
        lambda w, b: create_optimizer_v2([{"params": b, "lr": lr}], name, lr=lr / 10),
        lambda w, b: create_optimizer_v2([{"params": b, "lr": lr}], name),
    ]
    for make in makers:
        _timm_state_dict_contract(make)
        _timm_lowers_the_loss(make, non_contiguous=False)
        _timm_lowers_the_loss(make, non_contiguous=True)


def _rosenbrock(p):
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("name", ["ano", "anolog"])
def test_timm_convergence_contract(name):
    """Cyclic coordinate descent on Rosenbrock (2000 steps, one coordinate's gradient each)
    ends no farther from the optimum, and a small model's loss falls at every step."""
    ano_timm.register()
    param = torch.nn.Parameter(torch.tensor([1.5, 1.5]))
    optimizer = create_optimizer_v2([param], name, lr=1e-3)
    start = param.detach().dist(torch.tensor([1.0, 1.0]))
    for i in range(2000):
        optimizer.zero_grad()
        _rosenbrock(param).backward()
        with torch.no_grad():
            param.grad[1 - i % 2] = 0.0
        optimizer.step()
    assert param.detach().dist(torch.tensor([1.0, 1.0])) <= start
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
    )
    optimizer = create_optimizer_v2(model, opt=name, lr=5e-2)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    previous = math.inf
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(x).sum()
        loss.backward()
        assert loss.item() < previous
        previous = loss.item()
        optimizer.step()
