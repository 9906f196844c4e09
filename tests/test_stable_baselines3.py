"""Ano in Stable-Baselines3: ``policy_kwargs=dict(optimizer_class=..., optimizer_kwargs=...)``
on real Gymnasium environments, and a saved model whose optimizer state loads in a fresh process
(docs/stable-baselines3.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ano_optimizer import Ano, Anolog

sb3 = pytest.importorskip("stable_baselines3")
from stable_baselines3.common.logger import Logger  # noqa: E402


def _silent(model):
    """``model`` logging nowhere: SB3's default logger makes a folder in the temporary
    directory for every model that trains."""
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def _ppo(seed: int = 0):
    return _silent(
        sb3.PPO(
            "MlpPolicy",
            "CartPole-v1",
            learning_rate=3e-4,
            n_steps=128,
            batch_size=64,
            n_epochs=2,
            seed=seed,
            device="cpu",
            policy_kwargs=dict(
                optimizer_class=Ano, optimizer_kwargs=dict(betas=(0.92, 0.99), eps=1e-8)
            ),
        )
    )


@pytest.mark.slow
def test_ppo_trains_with_ano_and_its_state_survives_save_and_load_in_a_fresh_process(tmp_path):
    model = _ppo()
    model.learn(total_timesteps=256)
    optimizer = model.policy.optimizer
    assert type(optimizer) is Ano
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["lr"]) == ((0.92, 0.99), 1e-8, 3e-4)
    # 2 rollouts x 2 epochs x (128 / 64) minibatches
    assert {float(s["step"]) for s in optimizer.state.values()} == {8.0}

    model.save(tmp_path / "ppo")
    torch.save(optimizer.state_dict(), tmp_path / "expected.pt")
    code = f"""
import json, torch
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger
model = PPO.load({str(tmp_path / "ppo.zip")!r}, device="cpu")
model.set_logger(Logger(folder=None, output_formats=[]))
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
loaded = model.policy.optimizer.state_dict()
same = all(
    torch.equal(loaded["state"][i][key], expected["state"][i][key])
    for i in expected["state"] for key in expected["state"][i]
)
model.set_env(__import__("gymnasium").make("CartPole-v1"))
model.learn(total_timesteps=128, reset_num_timesteps=False)
print(json.dumps({{
    "class": type(model.policy.optimizer).__module__ + "." + type(model.policy.optimizer).__name__,
    "same_state": same,
    "same_groups": loaded["param_groups"] == expected["param_groups"],
    "steps": sorted({{float(s["step"]) for s in model.policy.optimizer.state.values()}}),
}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "class": "ano_optimizer.optimizer.Ano",
        "same_state": True,
        "same_groups": True,
        "steps": [12.0],  # the loaded state's 8 steps, then one more rollout
    }


def test_the_same_seed_gives_the_same_policy():
    # SB3 seeds torch's global generator when a model is built: build and train one at a time.
    a = _ppo(seed=3)
    a.learn(total_timesteps=128)
    b = _ppo(seed=3)
    b.learn(total_timesteps=128)
    for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sac_actor_and_critic_take_anolog():
    model = _silent(
        sb3.SAC(
            "MlpPolicy",
            "Pendulum-v1",
            learning_starts=32,
            batch_size=32,
            seed=0,
            device="cpu",
            policy_kwargs=dict(optimizer_class=Anolog, optimizer_kwargs=dict(weight_decay=0.0)),
        )
    )
    model.learn(total_timesteps=64)
    for optimizer in (model.actor.optimizer, model.critic.optimizer):
        assert type(optimizer) is Anolog
        assert {float(s["step"]) for s in optimizer.state.values()} == {32.0}
