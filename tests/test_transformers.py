"""Hugging Face Trainer integration: registry names as ``optim``, with a real Trainer.

Tiny BERT/GPT-2 models built from configs, synthetic data, a few steps each, CPU only.
"""

from __future__ import annotations

import enum
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from ano_optimizer.integrations import transformers as hf
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

from ano_optimizer import Ano, Anolog, get_optimizer_spec

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "hf_train_script.py"


@pytest.fixture(scope="module", autouse=True)
def registered():
    return hf.register()


# ------------------------------------------------------------------------------------ helpers


class TokenClassificationData(torch.utils.data.Dataset):
    """Label = parity of the first token: learnable by a tiny BERT."""

    def __init__(self, n: int = 16, seq_len: int = 8, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


class CountingData(torch.utils.data.Dataset):
    """Token sequences counting up by 3 modulo the vocabulary: a learnable causal-LM task."""

    def __init__(self, n: int = 16, seq_len: int = 12, vocab: int = 64) -> None:
        self.ids = (torch.arange(n)[:, None] * 7 + 3 * torch.arange(seq_len)[None, :]) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )


COMMON = {
    "report_to": "none",
    "use_cpu": True,
    "disable_tqdm": True,
    "per_device_train_batch_size": 4,
    "save_strategy": "no",
    "seed": 0,
}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), **{**COMMON, **overrides})


def inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def group_names(model, optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in inner(optimizer).param_groups]


def decayed_names(trainer, model) -> set[str]:
    """transformers' rule: the trainable parameters named by its get_decay_parameter_names."""
    decay = set(trainer.get_decay_parameter_names(model))
    return {n for n, p in model.named_parameters() if n in decay and p.requires_grad}


def adamw_groups(model, tmp_path, weight_decay: float) -> list[tuple[set[str], float]]:
    """The groups transformers' own AdamW gets for ``model``: the rule to match."""
    args = training_args(tmp_path / "adamw", optim="adamw_torch", weight_decay=weight_decay)
    trainer = Trainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    weight_decays = [g["weight_decay"] for g in optimizer.param_groups]
    return list(zip(group_names(model, optimizer), weight_decays, strict=True))


def run_cli(args: list[str], env=None, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ano_optimizer_command() -> list[str]:
    """The installed ``ano-optimizer`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("ano-optimizer")
    assert script.exists(), f"{script} missing: install the project (pip install -e .)"
    return [str(script)]


# ------------------------------------------------------------------------ Trainer, optim="ano"


def test_trainer_with_optim_ano_trains_with_transformers_decay_groups(tmp_path):
    model = tiny_bert()
    expected_groups = adamw_groups(model, tmp_path, weight_decay=0.01)

    args = training_args(
        tmp_path / "ano",
        optim="ano",
        optim_args="logarithmic_schedule=True",
        learning_rate=1e-3,
        weight_decay=0.01,
        max_steps=3,
    )
    assert args.optim is OptimizerNames("ano")
    trainer = Trainer(model=model, args=args, train_dataset=TokenClassificationData())
    trainer.train()

    optimizer = inner(trainer.optimizer)
    assert type(optimizer) is Ano
    # Same split and same weight decays as transformers' AdamW, from its get_decay_parameter_names.
    decay_names = decayed_names(trainer, model)
    assert expected_groups[0][0] == decay_names and expected_groups[1][0].isdisjoint(decay_names)
    assert [
        (names, g["weight_decay"])
        for names, g in zip(group_names(model, optimizer), optimizer.param_groups, strict=True)
    ] == expected_groups
    for group in optimizer.param_groups:
        assert group["initial_lr"] == 1e-3  # the scheduler's base: learning_rate
        assert group["betas"] == (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
        assert group["eps"] == args.adam_epsilon == 1e-8
        assert group["logarithmic_schedule"] is True
    # Every trained parameter took exactly the 3 optimizer steps.
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {3.0}


def test_hf_argument_parser_optim_anolog_trains_and_loss_goes_down(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    assert "anolog" in next(a for a in parser._actions if a.dest == "optim").choices
    (args,) = parser.parse_args_into_dataclasses(
        [
            *("--output_dir", str(tmp_path)),
            *("--optim", "anolog", "--optim_args", "eps=1e-7"),
            *("--learning_rate", "1e-2", "--adam_beta1", "0.8", "--adam_beta2", "0.95"),
            *("--weight_decay", "0.001", "--max_steps", "10", "--lr_scheduler_type", "constant"),
            *("--per_device_train_batch_size", "8", "--use_cpu", "--report_to", "none"),
            *("--disable_tqdm", "true", "--save_strategy", "no"),
        ]
    )
    assert args.optim is OptimizerNames("anolog")
    model = tiny_gpt2()
    data = CountingData()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    loss_before = trainer.evaluate(data)["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate(data)["eval_loss"]

    optimizer = inner(trainer.optimizer)
    assert type(optimizer) is Anolog
    assert group_names(model, optimizer)[0] == decayed_names(trainer, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.001, 0.0]
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (1e-2, (0.8, 0.95), 1e-7)
        assert group["logarithmic_schedule"] is True
    assert loss_after < 0.85 * loss_before, (loss_before, loss_after)


def test_set_optimizer_selects_a_registry_name(tmp_path):
    args = training_args(tmp_path).set_optimizer(
        name="ano",
        learning_rate=2e-3,
        weight_decay=0.05,
        beta1=0.85,
        beta2=0.98,
        epsilon=1e-6,
        args="foreach=false",
    )
    model = tiny_bert()
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is Ano
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["foreach"]) == (
        2e-3,
        (0.85, 0.98),
        1e-6,
        False,
    )


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(tmp_path):
    def trainer_for(output_dir):
        args = training_args(
            output_dir,
            optim="anolog",
            optim_args="betas=(0.9,0.99)",
            learning_rate=3e-3,
            weight_decay=0.01,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            per_device_train_batch_size=4,
        )
        return Trainer(model=tiny_gpt2(), args=args, train_dataset=CountingData())

    uninterrupted = trainer_for(tmp_path / "full")
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()

    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_weights = uninterrupted.model.state_dict()
    resumed_weights = resumed.model.state_dict()
    assert full_weights.keys() == resumed_weights.keys()
    for key, value in full_weights.items():
        assert torch.equal(value, resumed_weights[key]), key
    # The moments went through the checkpoint too, not only the weights.
    full_state = inner(uninterrupted.optimizer).state_dict()
    resumed_state = inner(resumed.optimizer).state_dict()
    assert full_state["param_groups"] == resumed_state["param_groups"]
    for index, state in full_state["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], resumed_state["state"][index][key]), (index, key)
    assert {float(s["step"]) for s in resumed_state["state"].values()} == {6.0}


# ------------------------------------------------------------------------------ optim_args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, {}),
        ("", {}),
        ("eps=1e-7", {"eps": 1e-7}),
        (
            "eps=1e-7, betas=(0.9,0.99), logarithmic_schedule=true",
            {"eps": 1e-7, "betas": (0.9, 0.99), "logarithmic_schedule": True},
        ),
        (
            "betas=[0.8, 0.9],foreach=None,maximize=False",
            {"betas": (0.8, 0.9), "foreach": None, "maximize": False},
        ),
        ("lr=3,mode=fast,name='a,b'", {"lr": 3, "mode": "fast", "name": "a,b"}),
    ],
)
def test_parse_optim_args_gives_real_types(text, expected):
    parsed = hf.parse_optim_args(text)
    assert parsed == expected
    assert {k: type(v) for k, v in parsed.items()} == {k: type(v) for k, v in expected.items()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eps=1e-7x", "malformed value '1e-7x' for key 'eps'"),
        ("betas=(0.9,0.99", "malformed value '(0.9,0.99' for key 'betas'"),
        ("betas={1: 2}", "for key 'betas'"),
        ("eps", "malformed entry 'eps'"),
        ("eps=", "key 'eps' has no value"),
        ("eps=1,eps=2", "key 'eps' is given twice"),
        ("1eps=2", "malformed entry '1eps=2'"),
    ],
)
def test_parse_optim_args_errors_name_the_key(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        hf.parse_optim_args(text)


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        (
            "epz=1e-7",
            r"unknown key 'epz' for optimizer 'ano' .*did you mean 'eps'\?.*accepts: betas, capturable, eps,",
        ),
        ("eps=1e-7x", r"malformed value '1e-7x' for key 'eps'"),
        ("eps=abc", r"key 'eps' of optimizer 'ano' must be a number, got 'abc'"),
        (
            "logarithmic_schedule=1",
            r"key 'logarithmic_schedule' of optimizer 'ano' must be true or false",
        ),
        ("weight_decay=0.1", r"key 'weight_decay' is not allowed.*TrainingArguments.weight_decay"),
        ("eps=-1.0", r"invalid eps=-1.0"),
    ],
)
def test_bad_optim_args_fail_at_optimizer_creation(tmp_path, optim_args, message):
    args = training_args(tmp_path, optim="ano", optim_args=optim_args)  # accepted until then
    trainer = Trainer(model=tiny_bert(), args=args)
    with pytest.raises(ValueError, match=message):
        trainer.create_optimizer()
    assert trainer.optimizer is None


def test_optim_args_override_training_arguments(tmp_path):
    args = training_args(
        tmp_path, optim="ano", learning_rate=1e-3, optim_args="lr=5e-4,betas=(0.7,0.9),eps=1e-6"
    )
    optimizer = Trainer(model=tiny_bert(), args=args).create_optimizer()
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (5e-4, (0.7, 0.9), 1e-6)


# Every key docs/transformers.md lists as accepted, with a value that must reach the optimizer.
OPTIM_ARGS_KEYS = {
    "betas": ("betas=(0.8,0.95)", (0.8, 0.95)),
    "capturable": ("capturable=true", True),
    "eps": ("eps=1e-6", 1e-6),
    "foreach": ("foreach=false", False),
    "fused": ("fused=true", True),
    "logarithmic_schedule": ("logarithmic_schedule=True", True),
    "lr": ("lr=5e-4", 5e-4),
    "maximize": ("maximize=true", True),
    "state_dtype": ("state_dtype=bfloat16", torch.bfloat16),
}


def test_the_key_table_is_every_keyword_the_trainer_may_pass():
    accepted = set(inspect.signature(Ano).parameters) - {"params", "weight_decay"}
    assert set(OPTIM_ARGS_KEYS) == accepted


@pytest.mark.parametrize("key", sorted(OPTIM_ARGS_KEYS))
def test_every_accepted_optim_args_key_reaches_the_optimizer(tmp_path, key):
    optim_args, expected = OPTIM_ARGS_KEYS[key]
    args = training_args(tmp_path, optim="ano", optim_args=optim_args, max_steps=1)
    optimizer = inner(Trainer(model=tiny_bert(), args=args).create_optimizer())
    for group in optimizer.param_groups:
        assert group[key] == expected


@pytest.mark.parametrize(
    ("value", "state_dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
        ("None", None),
    ],
)
def test_state_dtype_by_name_sets_the_dtype_of_the_moments(tmp_path, value, state_dtype):
    args = training_args(tmp_path, optim="anolog", optim_args=f"state_dtype={value}", max_steps=2)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenClassificationData())
    trainer.train()
    optimizer = inner(trainer.optimizer)
    for p, state in optimizer.state.items():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == (state_dtype or p.dtype)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "banana",
            r"key 'state_dtype' of optimizer 'ano' must be a torch dtype name such as "
            r"bfloat16 or float32 \(or None\), got 'banana'",
        ),
        ("3", r"must be a torch dtype name .*got 3"),
        ("int8", r"invalid state_dtype=torch.int8; it must be None"),
    ],
)
def test_bad_state_dtype_names_fail_before_training(tmp_path, value, message):
    args = training_args(tmp_path, optim="ano", optim_args=f"state_dtype={value}")
    trainer = Trainer(model=tiny_bert(), args=args)
    with pytest.raises(ValueError, match=message):
        trainer.create_optimizer()
    assert trainer.optimizer is None


# ------------------------------------------------------------------- registration, names


def test_register_twice_is_harmless():
    members = list(OptimizerNames)
    method = Trainer.get_optimizer_cls_and_kwargs
    original = method.__wrapped__
    assert not hasattr(original, "__wrapped__")  # wrapped exactly once

    assert hf.register() == hf.register() == hf.registered_names()
    assert list(OptimizerNames) == members
    assert Trainer.get_optimizer_cls_and_kwargs is method
    assert OptimizerNames("ano") is OptimizerNames.ANO


class _OldStyleTrainer(Trainer):
    # A regular method instead of transformers' static method: a shape register() cannot wrap.
    def get_optimizer_cls_and_kwargs(self, args, model=None):
        return torch.optim.SGD, {}


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        (
            (enum.Enum("OptimizerNames", {"ADAMW": "adamw"}), TrainingArguments, Trainer),
            "OptimizerNames is not the str Enum this relies on",
        ),
        ((OptimizerNames, object, Trainer), "TrainingArguments has no 'optim' field"),
        (
            (OptimizerNames, TrainingArguments, _OldStyleTrainer),
            "Trainer.get_optimizer_cls_and_kwargs is not a static method",
        ),
    ],
)
def test_register_guard_names_the_transformers_version(pieces, message):
    with pytest.raises(RuntimeError, match=r"does not support transformers 9\.99\.0: " + message):
        hf._check_pieces("9.99.0", *pieces)
    hf._check_pieces(transformers.__version__, OptimizerNames, TrainingArguments, Trainer)


def test_every_torch_registry_name_is_selectable():
    from ano_optimizer import list_optimizers

    for name in list_optimizers(framework="torch"):
        assert name in hf.registered_names()
        assert OptimizerNames(name).value == name


def test_unknown_name_fails_as_transformers_fails(tmp_path, capsys):
    with pytest.raises(
        ValueError, match=r"^anoo is not a valid OptimizerNames, please select one of \["
    ):
        training_args(tmp_path, optim="anoo")
    with pytest.raises(SystemExit) as exit_info:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "anoo"]
        )
    assert exit_info.value.code == 2
    assert "argument --optim: invalid choice: 'anoo'" in capsys.readouterr().err


def test_transformers_own_names_still_build_their_optimizers(tmp_path):
    args = training_args(tmp_path, optim="sgd", learning_rate=0.25)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.SGD and kwargs["lr"] == 0.25


# -------------------------------------------------------------------------- public route


def test_public_route_optimizer_cls_and_kwargs(tmp_path):
    args = training_args(
        tmp_path,
        learning_rate=2e-3,
        adam_beta2=0.99,
        weight_decay=0.1,
        optim_args="eps=1e-7",
        max_steps=2,
    )
    cls, kwargs = hf.optimizer_cls_and_kwargs(args, "AnoLog")  # names are case-insensitive
    assert cls is Anolog
    assert kwargs == {"lr": 2e-3, "betas": (0.9, 0.99), "eps": 1e-7}

    # Without a name, args.optim must be a registry name: the stock default is not.
    with pytest.raises(ValueError, match=f"unknown optimizer '{args.optim.value}'"):
        hf.optimizer_cls_and_kwargs(args)

    if "optimizer_cls_and_kwargs" not in inspect.signature(Trainer).parameters:
        pytest.skip("this transformers' Trainer has no optimizer_cls_and_kwargs argument")
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenClassificationData(),
        optimizer_cls_and_kwargs=(cls, kwargs),
    )
    trainer.train()
    optimizer = inner(trainer.optimizer)
    assert type(optimizer) is Anolog
    assert group_names(model, optimizer)[0] == decayed_names(trainer, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_adam_arguments_are_forwarded_when_the_spec_takes_them(tmp_path):
    spec = get_optimizer_spec("ano")
    assert spec.has_betas and spec.has_eps
    args = training_args(tmp_path, optim="ano", adam_beta1=0.5, adam_epsilon=1e-5)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is Ano and kwargs == {"lr": args.learning_rate, "betas": (0.5, 0.999), "eps": 1e-5}


# ------------------------------------------------------- saved arguments, CLI, plugins


@pytest.mark.slow
def test_saved_training_args_read_back_after_register(tmp_path):
    args = training_args(tmp_path, optim="ano", optim_args="eps=1e-7")
    Trainer(model=tiny_bert(), args=args).save_model(str(tmp_path))
    (tmp_path / "args.json").write_text(args.to_json_string())
    reader = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import HfArgumentParser, TrainingArguments
        out = {{}}
        try:
            torch.load({str(tmp_path / "training_args.bin")!r}, weights_only=False)
        except ValueError as error:
            out["before_register"] = str(error)
        from ano_optimizer.integrations.transformers import register
        register()
        loaded = torch.load({str(tmp_path / "training_args.bin")!r}, weights_only=False)
        (parsed,) = HfArgumentParser(TrainingArguments).parse_json_file({str(tmp_path / "args.json")!r})
        out["bin"] = [loaded.optim.value, loaded.optim_args]
        out["json"] = [parsed.optim.value, parsed.optim_args]
        print(json.dumps(out))
        """
    )
    result = run_cli([sys.executable, "-c", reader])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # Unpickling rebuilds OptimizerNames("ano"): it fails as transformers fails until register().
    assert out.pop("before_register").startswith("ano is not a valid OptimizerNames")
    assert out == {
        "bin": ["ano", "eps=1e-7"],
        "json": ["ano", "eps=1e-7"],
    }


SCRIPT_ARGS = [
    *("--max_steps", "6", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8"),
    *("--weight_decay", "0.01", "--use_cpu", "--report_to", "none"),
    *("--disable_tqdm", "true", "--save_strategy", "no"),
]


@pytest.mark.slow
def test_cli_run_unchanged_script_with_optim_ano(tmp_path):
    result = run_cli(
        [
            *ano_optimizer_command(),
            *("run", str(SCRIPT.relative_to(REPO)), "--optim", "ano"),
            *("--output_dir", str(tmp_path), *SCRIPT_ARGS),
        ]
    )
    report = json.loads((tmp_path / "optimizer_report.json").read_text())
    assert report["optimizer_class"] == "ano_optimizer.optimizer.Ano"
    assert report["main_module"] == "__main__"
    assert report["sys_path0"] == str(SCRIPT.parent)
    assert report["argv"][:3] == ["tests/hf_train_script.py", "--optim", "ano"]
    decay, no_decay = report["groups"]
    assert decay["param_names"] == report["decay_parameter_names"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay["betas"] == [0.9, 0.999] and decay["initial_lr"] == 1e-2
    assert report["loss_after"] < report["loss_before"]
    assert "with ano_optimizer.optimizer.Ano" in result.stdout


@pytest.mark.slow
def test_registry_plugin_name_works_in_trainer(tmp_path):
    from plugin_fixture import PLUGIN_NAME, env_with_path, module_name, write_plugin

    plugin_dir = write_plugin(tmp_path / "plugin")
    result = run_cli(
        [
            *ano_optimizer_command(),
            *("run", str(SCRIPT), "--optim", PLUGIN_NAME, "--optim_args", "momentum=0.5"),
            *("--output_dir", str(tmp_path), *SCRIPT_ARGS),
        ],
        env=env_with_path(plugin_dir),
    )
    report = json.loads((tmp_path / "optimizer_report.json").read_text())
    plugin_module = module_name("ano-fixture-plugin")
    assert report["optim"] == PLUGIN_NAME
    assert report["optimizer_class"] == f"{plugin_module}.torch_impl.SignSGD"
    decay, no_decay = report["groups"]
    # No betas/eps forwarded (the spec says it takes neither); momentum from optim_args.
    assert set(decay) - {"param_names", "initial_lr"} == {"lr", "momentum", "weight_decay"}
    assert decay["momentum"] == no_decay["momentum"] == 0.5
    assert decay["param_names"] == report["decay_parameter_names"]
    assert report["loss_after"] < report["loss_before"]
    assert "SignSGD" in result.stdout


def test_launcher_runs_a_script_as_python_does(tmp_path, monkeypatch, capsys):
    import argparse

    from ano_optimizer import cli
    from ano_optimizer.cli import run as launcher

    # The launcher takes over this process's argv and sys.path[0], as python would: restore them.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "scripts" / "train.py"
    script.parent.mkdir()
    script.write_text(
        "import json, sys\n"
        "from transformers.training_args import OptimizerNames\n"
        "record = [__name__, sys.argv, sys.path[0], OptimizerNames('anolog').value]\n"
        f"open({str(tmp_path / 'record.json')!r}, 'w').write(json.dumps(record))\n"
        "sys.exit(3)\n"
    )
    argv = [str(script), "--", "--optim", "anolog", "-h", "--", "x"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *argv])
    assert exit_info.value.code == 3
    record = json.loads((tmp_path / "record.json").read_text())
    # Exactly what `python train.py -- --optim anolog -h -- x` gives: both "--" kept.
    assert record == ["__main__", argv, str(script.parent), "anolog"]

    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    missing = parser.parse_args([str(tmp_path / "missing.py")])
    assert launcher.run(missing) == 2
    assert "can't open file" in capsys.readouterr().err
