"""A per-tensor loop performing the operations of the 1.0.0 release's PyTorch optimizer.

Only for timing: every temporary the release allocated is allocated here too. Its math differs
from the paper's (ε inside the square root), as documented in docs/algorithm.md.
"""

from __future__ import annotations

import torch


class Release100Ano(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.92, 0.99), weight_decay=0.0, eps=1e-8):
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps}
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                bias_c2 = 1 - beta2 ** state["step"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                square = torch.square(g)
                sign = torch.sign(square - v)
                v.mul_(beta2).add_(sign * square, alpha=1 - beta2)
                v_hat = v / bias_c2
                scaled_lr = lr / torch.sqrt(v_hat + eps)
                update = scaled_lr * g.abs() * torch.sign(m)
                if wd != 0.0:
                    p.mul_(1 - lr * wd)
                p.add_(-update)
