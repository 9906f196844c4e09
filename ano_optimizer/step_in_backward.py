"""Run the Ano update inside ``backward()``, one parameter at a time, and free each gradient at
once, so a training step never holds all gradients in memory.

``Tensor.register_post_accumulate_grad_hook`` fires when a parameter's gradient for this
backward pass is complete; the hook updates that parameter with its own optimizer and drops the
gradient. Peak memory falls by about the size of the gradients (the largest of them is still
alive for a moment).

Limits, which follow from never holding all gradients at once:

- no gradient clipping by the global norm (``clip_grad_norm_`` needs every gradient before any
  update);
- no gradient accumulation over several ``backward()`` calls: every ``backward()`` is a step;
- ``GradScaler``: the inf/nan check needs all gradients first, so mixed precision must use
  bfloat16 autocast (no scaler) with this helper;
- the optimizer is one per parameter: a learning-rate scheduler must be driven through
  :meth:`StepInBackward.set_lr`, and distributed wrappers that reduce gradients in their own
  hooks (DDP, FSDP) are not supported.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .optimizer import Ano
from .saved_state import checked_state_dict

__all__ = ["StepInBackward"]


class StepInBackward:
    """Update each parameter with ``optimizer_class([param], **options)`` as soon as its
    gradient is accumulated during ``backward()``.

    Args:
        params: the parameters to train (those that do not require grad are ignored).
        optimizer_class: :class:`~ano_optimizer.Ano` (default), :class:`~ano_optimizer.Anolog`
            or any ``torch.optim.Optimizer`` class.
        **options: keyword arguments of ``optimizer_class`` (``lr``, ``betas``, ``fused``, ...);
            an unknown one raises its ``TypeError`` here, before any hook is installed.

    Example:
        >>> import torch
        >>> from ano_optimizer.step_in_backward import StepInBackward
        >>> model = torch.nn.Linear(4, 2)
        >>> trainer = StepInBackward(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()  # updates the model
        >>> model.weight.grad is None
        True
        >>> trainer.remove()
    """

    def __init__(self, params: Iterable[Tensor], optimizer_class: type = Ano, **options) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("StepInBackward: no parameter that requires grad was given")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("StepInBackward: a parameter is listed more than once")
        self.optimizers: dict[Tensor, torch.optim.Optimizer] = {
            p: optimizer_class([p], **options) for p in params
        }
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def _step(self, param: Tensor) -> None:
        self.optimizers[param].step()
        param.grad = None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter's optimizer (for a schedule)."""
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict:
        """The per-parameter optimizers' state dicts, in parameter order."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load every per-parameter optimizer's state, or none: each entry is checked before any
        loads (Ano/Anolog check theirs whole), and should a load fail all the same, every
        optimizer is put back as it was."""
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.optimizers):
            count = (
                f"{len(saved)} optimizers"
                if isinstance(saved, (list, tuple))
                else "no 'optimizers' list"
            )
            raise ValueError(
                f"StepInBackward.load_state_dict: the state dict has {count}, "
                f"expected {len(self.optimizers)} (one per parameter)"
            )
        optimizers = list(self.optimizers.values())
        owner = "StepInBackward.load_state_dict"
        checked = [
            checked_state_dict(optimizer, entry, owner) if isinstance(optimizer, Ano) else entry
            for optimizer, entry in zip(optimizers, saved, strict=True)
        ]
        before = [{**opt.__dict__, "defaults": dict(opt.defaults)} for opt in optimizers]
        try:
            for optimizer, entry in zip(optimizers, checked, strict=True):
                if isinstance(optimizer, Ano):  # checked above, all before any is loaded
                    torch.optim.Optimizer.load_state_dict(optimizer, entry)
                else:
                    optimizer.load_state_dict(entry)
        except BaseException:
            for optimizer, attributes in zip(optimizers, before, strict=True):
                optimizer.__dict__.clear()
                optimizer.__dict__.update(attributes)
            raise

    def remove(self) -> None:
        """Remove the hooks: later ``backward()`` calls only accumulate gradients again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
