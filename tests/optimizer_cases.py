"""One declarative table of optimizer configurations that drives the core tests.

Each case names the class, its keyword arguments and what it exercises; tests iterate over the
table, so a new configuration is tested everywhere by adding one line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ano_optimizer import Ano, Anolog


@dataclass(frozen=True)
class Case:
    id: str
    cls: type
    kwargs: dict = field(default_factory=dict)

    def reference_kwargs(self) -> dict:
        """The hyper-parameters the NumPy oracle needs, with the class defaults filled in."""
        defaults = {
            "lr": 1e-4,
            "betas": (0.92, 0.99),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "logarithmic_schedule": self.cls is Anolog,
            "maximize": False,
        }
        return {**defaults, **self.kwargs}


CASES = [
    Case("ano-default", Ano, {"lr": 1e-3}),
    Case("ano-weight-decay", Ano, {"lr": 3e-3, "weight_decay": 0.1}),
    Case("ano-small-betas", Ano, {"lr": 1e-2, "betas": (0.5, 0.6)}),
    Case("ano-zero-beta1", Ano, {"lr": 1e-2, "betas": (0.0, 0.999)}),
    Case("ano-log-flag", Ano, {"lr": 1e-3, "logarithmic_schedule": True}),
    Case("anolog-weight-decay", Anolog, {"lr": 1e-3, "weight_decay": 0.05, "eps": 1e-6}),
    Case("ano-maximize", Ano, {"lr": 1e-3, "maximize": True}),
    Case("anolog-maximize", Anolog, {"lr": 2e-3, "maximize": True, "weight_decay": 0.01}),
]
