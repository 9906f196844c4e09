"""The study's three tasks and one training run of each.

- ``noise``: digits (or CIFAR-10) with Gaussian noise of standard deviation sigma added to every
  gradient entry before each optimizer step.
- ``labels``: the same data with symmetric label noise on the training and validation labels
  (test labels clean).
- ``rl``: PPO (discrete actions) or SAC (continuous actions) from Stable-Baselines3 on a
  Gymnasium environment, the optimizer given as ``policy_kwargs=dict(optimizer_class=...)``.

A run trains with one seed and returns its validation score (``phase="tuning"``) or its test
score (``phase="test"``): a tuning run never evaluates on the test data or test episodes.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Dataset

# Evaluation episodes get seeds of their own, apart from the training seeds.
VALIDATION_EPISODE_SEED = 10_000
TEST_EPISODE_SEED = 20_000


@dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer the study runs: its class, fixed keyword arguments and recommended rate."""

    name: str
    target: str  # "module:Class"
    recommended_lr: float
    kwargs: dict = field(default_factory=dict)
    origin: str = "registry"

    def load(self) -> type:
        module_name, _, attr = self.target.partition(":")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def options(self) -> dict:
        """The fixed keyword arguments, as the optimizer takes them."""
        return {key: from_settings(value) for key, value in self.kwargs.items()}

    def build(self, params, lr: float) -> torch.optim.Optimizer:
        return self.load()(params, **{**self.options(), "lr": lr})


def to_settings(value):
    """A keyword argument as settings.json keeps it: a torch dtype (``state_dtype`` of the
    8-bit names) as ``{"torch.dtype": "uint8"}``, anything else as it is."""
    if isinstance(value, torch.dtype):
        return {"torch.dtype": str(value).removeprefix("torch.")}
    return value


def from_settings(value):
    """The inverse of :func:`to_settings`."""
    if isinstance(value, dict) and set(value) == {"torch.dtype"}:
        return getattr(torch, value["torch.dtype"])
    return value


@dataclass(frozen=True)
class Task:
    """What the study needs to know of a task; ``run`` is in :func:`execute`."""

    name: str
    metric: str
    conditions: tuple[str, ...]  # keys of results.json
    values: tuple  # the condition values, in the order of ``conditions``
    lr_scale: float  # the grid is centred on recommended_lr * lr_scale
    description: str


def condition_key(task: str, value) -> str:
    if task == "noise":
        return f"sigma={value:g}"
    if task == "labels":
        return f"labels={100 * value:g}%"
    return str(value)


def add_gradient_noise(params: Sequence[torch.Tensor], sigma: float, generator) -> None:
    """Add N(0, sigma²) noise, drawn from ``generator``, to every entry of every gradient."""
    if sigma == 0:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                noise = torch.randn(
                    p.grad.shape, generator=generator, dtype=p.grad.dtype, device=p.grad.device
                )
                p.grad.add_(noise, alpha=sigma)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in % of ``model`` on ``x``, ``y``."""
    model.eval()
    correct = 0
    for start in range(0, len(y), 1024):
        logits = model(x[start : start + 1024])
        correct += int((logits.argmax(dim=1) == y[start : start + 1024]).sum())
    model.train()
    return 100.0 * correct / max(len(y), 1)


def train_supervised(
    data: Dataset,
    choice: OptimizerChoice,
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    sigma: float = 0.0,
    test: bool = False,
) -> dict:
    """Train one model; every optimizer sees the same initial weights, batches and noise.

    The epoch kept is the one of best validation accuracy; with ``test`` its test accuracy is
    the score, else its validation accuracy.
    """
    device = data.x_train.device
    torch.manual_seed(seed)
    model = data.make_model().to(device)
    optimizer = choice.build(model.parameters(), lr)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(10_000 + seed)
    n = len(data.y_train)
    history = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=batches).to(device)
        total = 0.0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_gradient_noise(params, sigma, noise)
            optimizer.step()
            total += float(loss.detach()) * len(index)
        entry = {"train_loss": total / n, "validation": accuracy(model, data.x_val, data.y_val)}
        if test:
            entry["test"] = accuracy(model, data.x_test, data.y_test)
        history.append(entry)
        if not math.isfinite(total):
            break  # diverged: the remaining epochs cannot recover from NaN weights
    best = max(range(len(history)), key=lambda i: history[i]["validation"])
    return {
        "validation": history[best]["validation"],
        "test": history[best]["test"] if test else None,
        "epoch": best + 1,
        "diverged": len(history) < epochs,
        "history": history,
    }


def _rl_algorithm(env_id: str):
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC

    env = gym.make(env_id)
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    env.close()
    return (PPO, "PPO") if discrete else (SAC, "SAC")


def mean_return(model, env_id: str, first_seed: int, episodes: int) -> float:
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=first_seed + episode)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return sum(returns) / len(returns)


def train_rl(
    env_id: str,
    choice: OptimizerChoice,
    lr: float,
    seed: int,
    steps: int,
    episodes: int,
    test: bool = False,
) -> dict:
    """Train PPO (discrete actions) or SAC (continuous) for ``steps`` environment steps; the
    score is the deterministic policy's mean return over ``episodes`` evaluation episodes,
    seeded apart from training (validation and test episodes apart from each other too)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    algorithm, algorithm_name = _rl_algorithm(env_id)
    policy_kwargs = {"optimizer_class": choice.load(), "optimizer_kwargs": choice.options()}
    if algorithm_name == "PPO":
        # A small-budget PPO setting for classic control (RL Zoo's CartPole values, fewer epochs).
        env = make_vec_env(env_id, n_envs=8, seed=seed)
        model = algorithm(
            "MlpPolicy", env, learning_rate=lr, n_steps=32, batch_size=256, n_epochs=10,
            gamma=0.98, gae_lambda=0.8, seed=seed, device="cpu", policy_kwargs=policy_kwargs,
        )  # fmt: skip
    else:
        model = algorithm(
            "MlpPolicy", env_id, learning_rate=lr, learning_starts=min(1000, steps // 4),
            seed=seed, device="cpu", policy_kwargs=policy_kwargs,
        )  # fmt: skip
    # SB3's default logger makes a folder in the temporary directory for every model.
    model.set_logger(Logger(folder=None, output_formats=[]))
    first = TEST_EPISODE_SEED if test else VALIDATION_EPISODE_SEED
    try:
        model.learn(total_timesteps=steps)
        score = mean_return(model, env_id, first + 100 * seed, episodes)
    except (ValueError, RuntimeError):  # NaN weights: torch's distributions refuse them
        score = None
    diverged = score is None or not math.isfinite(score)
    score = None if diverged else score
    return {
        "validation": None if test else score,
        "test": score if test else None,
        "algorithm": algorithm_name,
        "diverged": diverged,
    }


def timed(function, *args, **kwargs) -> dict:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    result["seconds"] = time.perf_counter() - started
    return result
