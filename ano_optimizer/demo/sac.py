"""The paper's SAC-on-MuJoCo setting, run with Stable-Baselines3, and the paper's own logs.

The paper's runs (``data/sac_mujoco_curves.csv``, from the author's experiment repository) used
a CleanRL-style SAC. ``PaperSAC`` (:func:`paper_sac_class`) is Stable-Baselines3's SAC with the
updates of those runs: one critic update per environment step (the two critics' squared errors
summed); every second step, two actor updates (gradient norm clipped at 0.5), each followed by
an entropy-coefficient update on alpha itself (``-alpha * (log_pi + target)``); the target
critics moved every step. What stays Stable-Baselines3's: the policy's log-std clamp ([-20, 2]
where CleanRL squashes it into [-5, 2]) and the entropy coefficient's optimizer (Adam, as in
CleanRL; the paper's logs do not say which the author's code used).

The logged metric is the paper's: the mean return of the training episodes that ended in each
2048-step window; a deterministic evaluation on separately seeded episodes comes with it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources

import torch

WINDOW = 2048  # the paper's logging interval (environment steps)
LEARNING_STARTS = 5000
PAPER_LR = 3e-4
EVALUATION_EPISODE_SEED = 30_000


@dataclass(frozen=True)
class PaperConfig:
    """One of the paper's optimizer configurations for SAC (actor and critics alike)."""

    name: str
    target: str  # "module:Class"
    kwargs: dict = field(default_factory=dict)

    def load(self) -> type:
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


# The paper's names; lr 3e-4 for all (its README: "Learning rate 3e-4 for actor and critics").
PAPER_CONFIGS = {
    "AnoBaseline": PaperConfig(
        "AnoBaseline", "ano_optimizer:Ano", {"betas": (0.92, 0.99), "eps": 1e-8}
    ),
    "Anolog": PaperConfig("Anolog", "ano_optimizer:Anolog", {}),
    "AdamBaseline": PaperConfig("AdamBaseline", "torch.optim:Adam", {"betas": (0.9, 0.999)}),
}
BASELINE = "AdamBaseline"


@functools.cache
def paper_sac_class() -> type:
    """``PaperSAC``, made on first use so that importing this module needs no SB3."""
    import numpy as np
    import torch.nn.functional as F
    from stable_baselines3 import SAC
    from stable_baselines3.common.utils import polyak_update

    class PaperSAC(SAC):
        """SAC with the paper's update schedule (see the module docstring)."""

        policy_frequency = 2
        actor_max_grad_norm = 0.5

        def _setup_model(self) -> None:
            super()._setup_model()
            self.critic_updates = 0

        def train(self, gradient_steps: int, batch_size: int = 256) -> None:
            self.policy.set_training_mode(True)
            self._update_learning_rate(
                [self.actor.optimizer, self.critic.optimizer, self.ent_coef_optimizer]
            )
            actor_losses, critic_losses = [], []
            for _ in range(gradient_steps):
                data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
                ent_coef = torch.exp(self.log_ent_coef.detach())
                with torch.no_grad():
                    next_actions, next_log_prob = self.actor.action_log_prob(data.next_observations)
                    next_q = torch.cat(self.critic_target(data.next_observations, next_actions), 1)
                    next_q = next_q.min(dim=1, keepdim=True).values
                    next_q = next_q - ent_coef * next_log_prob.reshape(-1, 1)
                    target_q = data.rewards + (1 - data.dones) * self.gamma * next_q
                current_q = self.critic(data.observations, data.actions)
                critic_loss = sum(F.mse_loss(q, target_q) for q in current_q)
                self.critic.optimizer.zero_grad()
                critic_loss.backward()
                self.critic.optimizer.step()
                critic_losses.append(critic_loss.item())
                self.critic_updates += 1

                if self.critic_updates % self.policy_frequency == 0:
                    for _ in range(self.policy_frequency):
                        actions_pi, log_prob = self.actor.action_log_prob(data.observations)
                        q_pi = torch.cat(self.critic(data.observations, actions_pi), 1)
                        min_q_pi = q_pi.min(dim=1, keepdim=True).values
                        actor_loss = (ent_coef * log_prob.reshape(-1, 1) - min_q_pi).mean()
                        self.actor.optimizer.zero_grad()
                        actor_loss.backward()
                        torch.nn.utils.clip_grad_norm_(
                            self.actor.parameters(), self.actor_max_grad_norm
                        )
                        self.actor.optimizer.step()
                        actor_losses.append(actor_loss.item())

                        with torch.no_grad():
                            _, log_prob = self.actor.action_log_prob(data.observations)
                        ent_coef_loss = -(
                            self.log_ent_coef.exp() * (log_prob + self.target_entropy)
                        ).mean()
                        self.ent_coef_optimizer.zero_grad()
                        ent_coef_loss.backward()
                        self.ent_coef_optimizer.step()
                        ent_coef = torch.exp(self.log_ent_coef.detach())

                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
            self._n_updates += gradient_steps
            self.logger.record("train/critic_loss", np.mean(critic_losses))
            if actor_losses:
                self.logger.record("train/actor_loss", np.mean(actor_losses))

    return PaperSAC


def _episode_recorder():
    from stable_baselines3.common.callbacks import BaseCallback

    class EpisodeRecorder(BaseCallback):
        """(environment step, return) of every training episode, as it ends."""

        def __init__(self):
            super().__init__()
            self.episodes: list[tuple[int, float]] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    return EpisodeRecorder()


def windowed_returns(episodes: list[tuple[int, float]], steps: int) -> list[float | None]:
    """The paper's metric: for each window ``(k*2048, (k+1)*2048]`` up to ``steps``, the mean
    return of the training episodes that ended in it (None where none ended)."""
    sums = [[] for _ in range(steps // WINDOW)]
    for step, value in episodes:
        index = (step - 1) // WINDOW
        if index < len(sums):
            sums[index].append(value)
    return [statistics.fmean(v) if v else None for v in sums]


def train_paper_sac(
    env_id: str, config_name: str, seed: int, steps: int, evaluation_episodes: int
) -> dict:
    """One run of the paper's protocol; returns the windowed training returns (``curve``, one
    value per 2048 steps) and the deterministic policy's mean return over
    ``evaluation_episodes`` episodes seeded apart from training (``evaluation``)."""
    import gymnasium as gym
    from stable_baselines3.common.logger import Logger

    from .tasks import mean_return

    config = PAPER_CONFIGS[config_name]
    model = paper_sac_class()(
        "MlpPolicy", gym.make(env_id), learning_rate=PAPER_LR, buffer_size=1_000_000,
        learning_starts=min(LEARNING_STARTS, steps // 2), batch_size=256, tau=0.005,
        gamma=0.99, train_freq=1, gradient_steps=1, ent_coef="auto", seed=seed, device="cpu",
        policy_kwargs={"net_arch": [256, 256], "optimizer_class": config.load(),
                       "optimizer_kwargs": dict(config.kwargs)},
    )  # fmt: skip
    model.set_logger(Logger(folder=None, output_formats=[]))
    recorder = _episode_recorder()
    diverged = False
    try:
        model.learn(total_timesteps=steps, callback=recorder)
        evaluation = mean_return(
            model, env_id, EVALUATION_EPISODE_SEED + 100 * seed, evaluation_episodes
        )
    except (ValueError, RuntimeError):  # NaN weights: torch's distributions refuse them
        evaluation, diverged = None, True
    if evaluation is not None and not math.isfinite(evaluation):
        evaluation, diverged = None, True
    return {
        "curve": windowed_returns(recorder.episodes, steps),
        "evaluation": evaluation,
        "diverged": diverged,
    }


# ------------------------------------------------------------------------ the paper's logs


@dataclass(frozen=True)
class LoggedPoint:
    """A point of a learning curve: mean and sample standard deviation over ``n`` seeds."""

    steps: int
    n: int
    mean: float
    std: float | None  # None for one seed


def paper_curves() -> dict[tuple[str, str], list[LoggedPoint]]:
    """The paper's logged SAC curves, ``(env, config) -> points``, from the vendored file."""
    text = resources.files(__package__).joinpath("data", "sac_mujoco_curves.csv").read_text()
    curves: dict[tuple[str, str], list[LoggedPoint]] = {}
    for row in csv.DictReader(text.splitlines()):
        point = LoggedPoint(
            int(row["total_steps"]), int(row["n_seeds"]), float(row["mean"]),
            float(row["std_sample"]) if row["std_sample"] else None,
        )  # fmt: skip
        curves.setdefault((row["env"], row["config"]), []).append(point)
    return curves


# The steps of the paper's table of selected figures (its README).
PAPER_TABLE_STEPS = (24_576, 30_720, 49_152, 100_352)


def matched_steps(steps: int) -> list[int]:
    """The logged steps a comparison of runs of ``steps`` steps reports: the paper's table
    steps it reaches, and its last window."""
    last = steps // WINDOW * WINDOW
    return sorted({s for s in PAPER_TABLE_STEPS if s <= last} | {last})


def point_at(curve: list[LoggedPoint], steps: int) -> LoggedPoint | None:
    return next((p for p in curve if p.steps == steps), None)


def summarize(values: list[float | None]) -> LoggedPoint | None:
    """Mean and sample standard deviation of the values present (std None for one)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else None
    return LoggedPoint(0, len(present), statistics.fmean(present), std)


def our_curve(runs: list[dict], env: str, config: str) -> list[LoggedPoint]:
    """Our runs of ``(env, config)``: mean and spread over seeds at every logged window."""
    curves = [r["curve"] for r in runs if r["condition"] == env and r["optimizer"] == config]
    if not curves:
        return []
    points = []
    for index in range(max(len(c) for c in curves)):
        summary = summarize([c[index] if index < len(c) else None for c in curves])
        if summary is not None:
            points.append(LoggedPoint((index + 1) * WINDOW, summary.n, summary.mean, summary.std))
    return points


def matched_table(
    ours: dict[tuple[str, str], list[LoggedPoint]],
    paper: dict[tuple[str, str], list[LoggedPoint]],
    env: str,
    configs: list[str],
    steps: list[int],
) -> list[dict]:
    """One row per logged step: the paper's and our point of each config, and each config's gap
    to the Adam baseline (paper and ours)."""
    rows = []
    for step in steps:
        row = {"env": env, "steps": step}
        for source, curves in (("paper", paper), ("ours", ours)):
            points = {c: point_at(curves.get((env, c), []), step) for c in configs}
            for config, point in points.items():
                row[f"{source} {config}"] = point
            base = points.get(BASELINE)
            for config, point in points.items():
                if config != BASELINE:
                    gap = None if point is None or base is None else point.mean - base.mean
                    row[f"{source} {config} - {BASELINE}"] = gap
        rows.append(row)
    return rows


def format_point(point: LoggedPoint | None) -> str:
    if point is None:
        return "-"
    std = "" if point.std is None else f" ± {point.std:.0f}"
    return f"{point.mean:.0f}{std} ({point.n})"


def format_matched_table(rows: list[dict], configs: list[str]) -> str:
    """A Markdown table of :func:`matched_table`'s rows."""
    others = [c for c in configs if c != BASELINE]
    header = ["env", "steps"]
    for config in configs:
        header += [f"paper {config}", f"ours {config}"]
    for config in others:
        header += [f"gap {config} (paper)", f"gap {config} (ours)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["env"], f"{row['steps']:,}"]
        for config in configs:
            cells += [format_point(row[f"paper {config}"]), format_point(row[f"ours {config}"])]
        for config in others:
            for source in ("paper", "ours"):
                gap = row[f"{source} {config} - {BASELINE}"]
                cells.append("-" if gap is None else f"{gap:+.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_env(path, env: str, ours, paper, configs: list[str], steps: int) -> None:
    """Our curve (solid, band: ± one std over seeds) and the paper's (dashed, its band lighter)
    for each config, to ``steps``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.6), layout="constrained")
    axis = figure.subplots()
    for index, config in enumerate(configs):
        color = f"C{index}"
        for source, curves, style, alpha in (
            ("ours", ours, "-", 0.25),
            ("paper", paper, "--", 0.1),
        ):
            points = [p for p in curves.get((env, config), []) if p.steps <= steps]
            if not points:
                continue
            x = [p.steps for p in points]
            mean = [p.mean for p in points]
            std = [p.std or 0.0 for p in points]
            n = max(p.n for p in points)
            axis.plot(x, mean, style, color=color, label=f"{config}, {source} (n={n})")
            axis.fill_between(
                x, [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=alpha,
                linewidth=0,
            )  # fmt: skip
    axis.set(
        title=f"SAC on {env}: training-episode return per {WINDOW}-step window",
        xlabel="environment steps", ylabel="mean return (± std over seeds)",
    )  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=90)


def collect(settings: dict, runs: list[dict]) -> dict | None:
    """results.json's ``sac`` entry: per environment, our curve and evaluation per config, and
    the rows of the matched-step table against the paper's logs; None without the sac task."""
    spec = settings.get("sac")
    if not spec:
        return None
    paper = paper_curves()
    configs = list(spec["configs"])
    ours_runs = [r for r in runs if r["task"] == "sac"]
    found = {}
    for env in spec["envs"]:
        ours = {(env, c): our_curve(ours_runs, env, c) for c in configs}
        evaluations = {
            c: summarize([r["evaluation"] for r in ours_runs
                          if r["condition"] == env and r["optimizer"] == c])
            for c in configs
        }  # fmt: skip
        rows = matched_table(ours, paper, env, configs, matched_steps(spec["steps"]))
        found[env] = {
            "configs": configs,
            "curves": {c: [dataclasses.astuple(p) for p in ours[(env, c)]] for c in configs},
            "evaluation": {
                c: None if e is None else {"mean": e.mean, "std": e.std, "n": e.n}
                for c, e in evaluations.items()
            },
            "matched": [_json_row(row) for row in rows],
            "table": format_matched_table(rows, configs),
        }
    return found


def _json_row(row: dict) -> dict:
    return {k: dataclasses.asdict(v) if isinstance(v, LoggedPoint) else v for k, v in row.items()}


def format_results(entry: dict, settings: dict) -> str:
    """The sac block of the printed tables."""
    blocks = []
    for env, result in entry.items():
        evaluation = ", ".join(
            f"{c} {format_point(None if e is None else LoggedPoint(0, e['n'], e['mean'], e['std']))}"
            for c, e in result["evaluation"].items()
        )
        blocks.append(
            f"sac {env}: {settings['sac']['metric']}, mean ± std (seeds), the paper's logs "
            f"beside ours; gap: config - {BASELINE}\n{result['table']}\n"
            f"deterministic evaluation after {settings['sac']['steps']:,} steps: {evaluation}"
        )
    return "\n\n".join(blocks)


def write_curves_csv(path, entry: dict, steps: int) -> None:
    """Ours and the paper's curve of every env and config, to ``steps``."""
    paper = paper_curves()
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["env", "config", "source", "steps", "n_seeds", "mean", "std"])
        for env, result in entry.items():
            for config in result["configs"]:
                for point in result["curves"][config]:
                    writer.writerow([env, config, "ours", *point])
                for p in paper.get((env, config), []):
                    if p.steps <= steps:
                        writer.writerow([env, config, "paper", p.steps, p.n, p.mean, p.std])


def plot(folder, entry: dict, steps: int) -> None:
    paper = paper_curves()
    for env, result in entry.items():
        ours = {(env, c): [LoggedPoint(*p) for p in result["curves"][c]] for c in result["configs"]}
        plot_env(folder / f"sac-{env}.png", env, ours, paper, result["configs"], steps)
