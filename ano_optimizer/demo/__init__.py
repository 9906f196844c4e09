"""A fair study on this machine: does Ano help on noisy problems? Tuned rates, three tasks.

Tasks (--tasks, default all):
  noise   digits (scikit-learn, bundled) with Gaussian noise of standard deviation sigma on
          every gradient entry (sigma 0, 0.05, 0.1, 0.2)
  labels  digits with 0, 20 or 40 % of the training and validation labels replaced by another
          class at random (test labels clean)
  rl      PPO on CartPole-v1 through Stable-Baselines3 (--rl-env: another Gymnasium id;
          continuous actions, e.g. Pendulum-v1, train with SAC)

Protocol, the same for every optimizer: a grid of 7 learning rates spanning 1000x around its
recommended rate; the rate with the best mean validation score over the tuning seeds is chosen
(flagged * when at an edge of the grid); the reported figure is the test score, mean ± std
over other seeds, at that rate. Supervised runs keep the epoch of best validation accuracy; RL
runs score the deterministic policy on evaluation episodes seeded apart from training.

Runs go to a process pool (one thread each, --workers), with a progress bar. Every finished run
is appended to OUTPUT/runs.jsonl at once; Ctrl-C (SIGTERM) writes the results so far and exits
with 130 (143), and --resume continues the study from its folder. Output: results.json, results.csv, runs.csv
and one PNG per task. With --cifar10 PATH the noise and labels tasks run the paper's setting
(small CNN, 100 epochs) on a CIFAR-10 python-format folder, read with a data-only unpickler.

examples:
  ano-optimizer demo                          # all three tasks, ~3 minutes on 2 cores
  ano-optimizer demo --quick                  # every task at a tiny scale, under a minute
  ano-optimizer demo --tasks rl --rl-env Pendulum-v1 --rl-steps 20000
  ano-optimizer demo --resume --output demo-results
"""

from __future__ import annotations

from .study import add_arguments, run

__all__ = ["add_arguments", "run"]
