"""The Ano and Anolog optimizers for PyTorch: class, functional API and execution paths.

Layout follows ``torch/optim/adam.py``: the :class:`Ano` class gathers per-group tensors,
:func:`ano` is the functional API, and :func:`_single_tensor_ano` (the readable reference) and
:func:`_multi_tensor_ano` (``torch._foreach_*``) are the execution paths. Both paths run the very
same sequence of elementwise operations, so they agree bit for bit on every input they share.

:func:`_float32_math_ano` is the path for state kept in a narrower dtype
(``state_dtype=torch.bfloat16`` halves the optimizer's memory): each block of state is widened,
updated exactly as above, and written back with stochastic rounding (:mod:`.rounding`), so the
rounding error averages out instead of accumulating. With round-to-nearest, ``exp_avg_sq`` at
``β2 = 0.999`` loses 0.1 % per step when gradients shrink, less than half a bfloat16 ulp, so
every decrease would be rounded away. A complex parameter's state in a real ``state_dtype`` is
kept as its real view (shape ``(*param.shape, 2)``): there is no complex bfloat16. The
``fused=True`` kernels (:mod:`.fused`) handle every state dtype themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from operator import attrgetter, is_, itemgetter

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import blockwise8, rounding
from . import hyperparameters as hp
from ._torch_internals import (
    capture_health_check,
    default_foreach,
    dtensor_class,
    foreach_lerp_,
    group_by_device_and_dtype,
    lerp_,
    local_shard_offset,
    scalar_dtype,
    torch_function_subclasses_off,
)
from .fused import FusedLists, fused_ano, kernel_step, kernel_step_groups, kernels_accept, native
from .fused.torch_step import fused_step_checked_
from .group_options import check_group_options, warn_near_misses
from .saved_state import checked_state_dict, keep_state_dtype_on_load
from .step_scalars import per_tensor_scalars, unscale_or_skip
from .tensor_checks import check_amp_tensors, check_step_tensors, flattens

__all__ = ["Ano", "Anolog", "ano"]

# The single-tensor path streams each contiguous tensor through small scratch buffers in
# chunks of this many elements: the ~10 elementwise passes of one update then hit L2 cache
# instead of main memory, and the step allocates nothing proportional to the model.
_CHUNK_NUMEL = 1 << 17
# The foreach path allocates its temporaries per bucket of tensors of at most this many
# elements (a larger tensor forms a bucket of its own), which bounds its peak extra memory.
_FOREACH_BUCKET_NUMEL = 1 << 22
# The float32-math path widens state in blocks this small, so that its float32 scratch stays
# in cache and costs no memory to speak of.
_BLOCK_NUMEL = 1 << 16


_GRAD = attrgetter("grad")
_IS_NONE = partial(is_, None)
_EXP_AVG, _EXP_AVG_SQ, _STEP = itemgetter("exp_avg"), itemgetter("exp_avg_sq"), itemgetter("step")


class Ano(Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = hp.DEFAULT_LR,
        betas: tuple[float, float] = hp.DEFAULT_BETAS,
        weight_decay: float = hp.DEFAULT_WEIGHT_DECAY,
        eps: float = hp.DEFAULT_EPS,
        logarithmic_schedule: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "logarithmic_schedule": logarithmic_schedule,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "state_dtype": state_dtype,
        }
        # Validate the defaults before the base class touches any parameter group.
        defaults["betas"] = check_group_options(defaults, type(self).__name__)
        if isinstance(params, Tensor):
            # The base class's own error, before this class takes the iterable apart.
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {torch.typename(params)}"
            )
        if isinstance(params, set):
            # The base class's warning, which it cannot give once the set is a list.
            warnings.warn(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list "
                "instead. This will be an error in a future release.",
                FutureWarning,
                stacklevel=2,
            )
        params = list(params)
        given_groups = params if params and isinstance(params[0], dict) else []
        # The base class fills the options into each group dict as it adds it: it gets copies,
        # so that a group refused later leaves every caller's dict as it was.
        super().__init__([dict(g) for g in given_groups] or params, defaults)
        # Every group was accepted: as with torch.optim, the caller's dicts become the groups.
        for index, given in enumerate(given_groups):
            if isinstance(given, dict):
                given.clear()
                given.update(self.param_groups[index])
                self.param_groups[index] = given
        if fused:
            # torch.amp.GradScaler then hands over grad_scale/found_inf instead of unscaling.
            self._step_supports_amp_scaling = True
            if any(p.is_cpu for g in self.param_groups for p in g["params"]):
                native.load()  # the CPU kernel is built (once per machine) before the first step
        keep_state_dtype_on_load(self)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group; its options are checked first, and a refused group changes
        neither the optimizer nor ``param_group``."""
        owner = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {torch.typename(param_group)}")
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        betas = check_group_options({**self.defaults, **options}, owner)
        warn_near_misses(param_group, owner, stacklevel=4)
        group = dict(param_group)
        if "betas" in group:
            group["betas"] = betas
        super().add_param_group(group)
        # Accepted: the caller's dict becomes the group, completed, as in torch.optim.
        param_group.clear()
        param_group.update(group)
        self.param_groups[-1] = param_group

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch's base class gives its defaults `differentiable` here (on unpickling, deepcopy
        # and every load): Ano has no such option, and copied into the groups below it made
        # state_dict() gain a key across load_state_dict and deepcopy.
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    # The 1.0.0 release kept the step as a Python int.
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=scalar_dtype())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by :class:`Ano`, :class:`Anolog` or the 1.0.0 release.

        Unlike the base class, this checks the whole state dict before changing anything: the
        groups' options and keys (a state dict of another optimizer is refused, even with Ano's
        keys added), every step count (a whole number >= 0) and every moment (shape, dtype,
        finite values, ``exp_avg_sq >= 0``). A refused state dict raises ``ValueError`` and
        leaves this optimizer exactly as it was, and still steppable; ``state_dict`` itself is
        never changed. A 1.0.0 state dict (groups of exactly ``lr``, ``betas``,
        ``weight_decay``, ``eps``; integer steps) has no ``logarithmic_schedule``: each group
        keeps this optimizer's setting.
        """
        state_dict = checked_state_dict(self, state_dict, f"{type(self).__name__}.load_state_dict")
        # Should torch's loader or a hook fail all the same, the optimizer is put back.
        before = {**self.__dict__, "defaults": dict(self.defaults)}
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    # Set by an eager step() while it gathers tensors: where _init_group lists new state.
    _new_state: list | None = None

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps) -> bool:
        """Append the parameters of ``group`` that have a gradient, and their gradients and
        state, to the lists; create the state on a parameter's first step. Return whether any
        parameter is complex. (The name and signature are torch's: ``torch.compile`` runs this
        method eagerly instead of tracing it.)"""
        stepped, stepped_grads, states = self._stepped_states(group)
        params += stepped
        grads += stepped_grads
        exp_avgs += map(_EXP_AVG, states)
        exp_avg_sqs += map(_EXP_AVG_SQ, states)
        state_steps += map(_STEP, states)
        return any(map(Tensor.is_complex, stepped))

    def _stepped_states(self, group: dict) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        """The parameters of ``group`` that have a gradient, their gradients and their state
        dicts; the state is created on a parameter's first step.

        Each pass is one C-level ``map`` where it can be: the step begins with every object
        out of cache (the last step and the backward pass evicted them), and a map meets the
        tensors' cache misses with less interpreter work between them."""
        grads = list(map(_GRAD, group["params"]))
        if any(map(_IS_NONE, grads)):
            stepped = [p for p, g in zip(group["params"], grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        else:
            stepped = list(group["params"])
        states = list(map(self.state.__getitem__, stepped))
        if all(states):
            return stepped, grads, states
        for p, state in zip(stepped, states, strict=True):
            if not state:
                if self._new_state is not None:
                    self._new_state.append(p)
                # Lazy creation, keyed by the parameter: an engine may swap or reshard
                # parameters before the first step, and a zero-gradient lr=0 step stays a
                # no-op. The fused kernel and capturable steps read the step on the
                # parameter's device (no host sync); torch's loader puts a saved step there for
                # such groups too.
                step_device = p.device if group["fused"] or group["capturable"] else None
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype(), device=step_device)
                state.update(_new_moments(p, group["state_dtype"]))
        return stepped, grads, states

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Every group's options and every tensor the step reads or writes are checked first: a
        step either runs whole or raises with nothing changed. Should a kernel fail once tensors
        have begun to change (memory running out, say), its error is raised with a note saying
        which groups were updated.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss; it is
                called with gradients enabled.
        """
        # As torch.optim.Adam: capturing a group without capturable=True is a clear error.
        capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        owner = type(self).__name__
        # Options may have been changed since construction (a scheduler, a user, a loaded
        # group); all of them are checked before anything changes.
        betas = [check_group_options(g, owner, read_tensor_lr=False) for g in self.param_groups]
        for group, pair in zip(self.param_groups, betas, strict=True):
            if group["betas"] != pair:
                group["betas"] = pair
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        check_amp_tensors(grad_scale, found_inf, self.param_groups, owner)
        # _init_group notes the parameters whose state it creates (a first step).
        self._new_state = []
        try:
            batches = self._gathered_batches()
            if self._stepped_by_the_kernel(batches, grad_scale, found_inf):
                return loss
            self._check_batches(batches, owner)
        except BaseException:
            for p in self._new_state:  # the state this call created: nothing else has changed
                self.state.pop(p, None)
            raise
        finally:
            self._new_state = None
        for done, (index, group, lists, has_complex, scales) in enumerate(batches):
            try:
                self._update_group(index, group, lists, scales, has_complex, grad_scale, found_inf)
            except Exception as error:
                # The error keeps its type (torch.OutOfMemoryError stays catchable as such)
                # and says what had changed.
                note = (
                    f"{owner}.step() failed in parameter group {index} after changing tensors: "
                    f"{_progress(batches, done)}; load the last checkpoint before training on"
                )
                if not hasattr(error, "add_note"):  # Python 3.10
                    raise RuntimeError(note) from error
                error.add_note(note)
                raise
        return loss

    def _gathered_batches(self) -> list:
        """Each group's tensors (local shards of DTensors), unchecked: ``[group index, group,
        (params, grads, exp_avgs, exp_avg_sqs, steps), has_complex, scales]`` for each group
        with a gradient. ``has_complex`` is None (not known yet): the kernel refuses complex
        tensors, and :meth:`_check_batches` finds it where the kernel does not take a step."""
        batches = []
        for index, group in enumerate(self.param_groups):
            params, grads, states = self._stepped_states(group)
            if params:
                exp_avgs = list(map(_EXP_AVG, states))
                exp_avg_sqs = list(map(_EXP_AVG_SQ, states))
                scales = _scales(group, params, states)
                lists = (
                    *_local_shard_lists(params, grads, exp_avgs, exp_avg_sqs),
                    list(map(_STEP, states)),
                )
                batches.append([index, group, lists, None, scales])
        return batches

    def _stepped_by_the_kernel(self, batches: list, grad_scale, found_inf) -> bool:
        """Step every group with one call of the C++ kernel where every group is a fused CPU
        group, which the kernel checks whole before it changes any tensor (so no separate check
        call): True; or False, with nothing changed, where a group is not such a group or the
        kernel refuses a tensor (the careful route then checks in Python, and splits groups)."""
        if not _kernel_may_take(batches):
            return False
        amp = {"grad_scale": grad_scale, "found_inf": found_inf}
        # No real views: the kernel refuses a complex tensor, and nothing has changed then.
        if len(batches) == 1:
            _, group, lists, _, scales = batches[0]
            lists = FusedLists(*lists, scales, has_complex=False)
            call = partial(kernel_step, lists, {**_step_scalars(group), **amp})
        else:
            # Every group's tensors in one set of lists; beside a group with 8-bit codes, a
            # group without them gets empty scales (FusedLists fills them in).
            columns = [[t for batch in batches for t in batch[2][k]] for k in range(5)]
            scales = [
                s for _, _, lists, _, group_scales in batches
                for s in (group_scales or [None] * len(lists[0]))
            ]  # fmt: skip
            call = partial(
                kernel_step_groups, FusedLists(*columns, scales, has_complex=False),
                [len(lists[0]) for _, _, lists, _, _ in batches],
                [_step_scalars(group) for _, group, _, _, _ in batches], **amp,
            )  # fmt: skip
        # Once the kernel has run, the state this step created is in use: nothing to undo.
        new_state, self._new_state = self._new_state, []
        stepped = call()
        if not stepped:
            self._new_state = new_state
        return stepped

    def _check_batches(self, batches: list, owner: str) -> None:
        """Check every batch's tensors (see :meth:`_gathered_batches`) before any changes.
        Fused CPU groups are checked by the kernel itself (in C++, a fraction of the Python
        checks' time) where it takes them all: one check call per group
        (``ano::fused_step_check``; a tensor learning rate off the CPU keeps groups out of
        the one-call step). The groups were offered to the kernel already
        (:meth:`_stepped_by_the_kernel`): they are here because the kernel refused them, or
        cannot take them in one call. Every batch's ``has_complex`` is known afterwards."""
        kernel_takes_all = len(batches) > 1 and _kernel_checks(batches)
        for batch in batches:
            batch[3] = not kernel_takes_all and any(map(Tensor.is_complex, batch[2][0]))
        if kernel_takes_all:
            return
        for batch in batches:
            index, group, (params, grads, exp_avgs, exp_avg_sqs, steps), _, scales = batch
            grads = check_step_tensors(
                params, grads, exp_avgs, exp_avg_sqs, steps, owner=owner,
                where=_describer(index, group, params), scales=scales,
            )  # fmt: skip
            if group["capturable"]:
                describe = _describer(index, group, params)
                for position, (p, step) in enumerate(zip(params, steps, strict=True)):
                    _check_capturable(
                        p, group["lr"], step, owner, lambda k=position, d=describe: d(k)
                    )
            batch[2] = (params, grads, exp_avgs, exp_avg_sqs, steps)

    def _update_group(self, index, group, lists, scales, has_complex, grad_scale, found_inf):
        params, grads, exp_avgs, exp_avg_sqs, steps = lists
        if not group["fused"] and unscale_or_skip(grads, grad_scale, found_inf):
            return
        with torch_function_subclasses_off(lists):
            _ano_group(
                params, grads, exp_avgs, exp_avg_sqs, steps, scales=scales,
                foreach=group["foreach"], fused=group["fused"],
                grad_scale=grad_scale if group["fused"] else None,
                found_inf=found_inf if group["fused"] else None,
                has_complex=has_complex, capturable=group["capturable"], checked=True,
                owner=type(self).__name__, where=_describer(index, group, params),
                **_step_scalars(group),
            )  # fmt: skip

    def _traced_step(self) -> None:
        """The step as ``torch.compile`` traces it: the same updates without the checks, which
        Dynamo's guards on the tensors' metadata stand in for."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for index, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            if params:
                lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
                scales = _scales(group, params, [self.state[p] for p in params])
                self._update_group(index, group, lists, scales, has_complex, grad_scale, found_inf)


def _new_moments(param: Tensor, state_dtype: torch.dtype | None) -> dict[str, Tensor]:
    """A parameter's zero moments (and their scales, for 8-bit codes)."""
    if state_dtype is torch.uint8:
        if blockwise8.takes_codes(param):
            return blockwise8.quantized_moments(param)
        state_dtype = blockwise8.float_state_dtype(param, state_dtype)
    return {key: _new_moment(param, state_dtype) for key in ("exp_avg", "exp_avg_sq")}


def _new_moment(param: Tensor, state_dtype: torch.dtype | None) -> Tensor:
    """A zero moment for ``param``: like it, or in ``state_dtype``; a complex parameter's moment
    in a real ``state_dtype`` is kept as its real view (there is no complex bfloat16)."""
    if param.is_complex() and state_dtype is not None:
        param = torch.view_as_real(param)
    return torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)


def _scales(group: dict, params: list[Tensor], states: list[dict]) -> list[tuple] | None:
    """Each parameter's 8-bit moment scales and the index of its first element in the whole
    tensor (not 0 for a shard), or None where its moments are not codes; None for a group
    whose ``state_dtype`` is not ``torch.uint8`` (its moments are floats)."""
    if group["state_dtype"] is not torch.uint8:
        return None
    dtensor = dtensor_class()
    scales = []
    for p, state in zip(params, states, strict=True):
        if "exp_avg_scale" not in state and "exp_avg_sq_scale" not in state:
            scales.append(None)
        elif dtensor is None or not isinstance(p, dtensor):
            scales.append((state["exp_avg_scale"], state["exp_avg_sq_scale"], 0))
        else:
            # Rounding noise follows the whole tensor's element index, so a shard rounds
            # as the same rows of the unsharded tensor do.
            shards = _local_shards(state["exp_avg_scale"], state["exp_avg_sq_scale"])
            scales.append((*shards, local_shard_offset(p)))
    return scales


def _step_scalars(group: dict) -> dict:
    """A group's options as the update takes them (:func:`ano`'s scalar keywords)."""
    beta1, beta2 = group["betas"]
    return {
        "beta1": beta1, "beta2": beta2, "lr": group["lr"], "weight_decay": group["weight_decay"],
        "eps": group["eps"], "logarithmic_schedule": group["logarithmic_schedule"],
        "maximize": group["maximize"],
    }  # fmt: skip


def _kernel_may_take(batches: list) -> bool:
    """Whether every group is a fused CPU group, which the C++ kernel (built here) may take."""
    return (
        bool(batches)
        and all(
            group["fused"] and not group["capturable"] and lists[0][0].is_cpu
            for _, group, lists, _, _ in batches
        )
        and native.load().loaded
    )


def _kernel_checks(batches: list) -> bool:
    """Whether the fused CPU kernel takes every group's tensors as they are, by its own checks
    (see :meth:`Ano._check_batches`)."""
    if not _kernel_may_take(batches):
        return False
    return all(
        kernels_accept(FusedLists(*lists, scales, has_complex))
        for _, _, lists, has_complex, scales in batches
    )


def _describer(index: int, group: dict, params: list[Tensor]) -> Callable[[int], str]:
    """How errors name the ``i``-th stepped parameter of group ``index``."""

    def describe(i: int) -> str:
        param = params[i]
        position = next(k for k, p in enumerate(group["params"]) if p is param)
        names = group.get("param_names")
        name = f"{names[position]!r}, " if names and position < len(names) else ""
        return f"parameter {position} of parameter group {index} ({name}shape {tuple(param.shape)})"

    return describe


def _progress(batches: list, failed: int) -> str:
    """What a step that failed in ``batches[failed]`` had changed."""
    done = [batch[0] for batch in batches[:failed]]
    untouched = [batch[0] for batch in batches[failed + 1 :]]
    return (
        f"groups {done or 'none'} were updated, group {batches[failed][0]} may be partly updated "
        f"(step counts, parameters or moments), groups {untouched or 'none'} were not changed"
    )


def _check_capturable(
    param: Tensor, lr, step: Tensor | None, owner: str, where: Callable[[], str] | None = None
) -> None:
    """A captured CUDA graph replays device work only: a value read on the host during capture
    (a CPU learning rate or step) would be frozen into the graph, so both must live on the
    parameter's device. ``where`` names the parameter, called only for an error (naming costs
    a search of the group, every step)."""
    for name, value in (("a tensor lr", lr), ("state['step']", step)):
        if isinstance(value, Tensor) and value.device != param.device:
            named = f" ({where()})" if where is not None else ""
            raise ValueError(
                f"{owner}: capturable=True needs {name} on the parameters' device "
                f"({param.device}), got one on {value.device}{named}; "
                "move it there (lr) or load the state dict into an optimizer created with "
                "capturable=True (step)"
            )


Ano.__doc__ = r"""Implements Ano and, with ``logarithmic_schedule=True``, Anolog.

    From "Ano: Faster is Better in Noisy Landscapes" (Kegreisz, 2025). The direction of the
    update is the sign of the momentum, its size the magnitude of the current gradient,
    normalised by a Yogi-like additive second moment:

    .. math::
       \begin{aligned}
            &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
                \epsilon \text{ (eps)}, \lambda \text{ (weight decay)}, \theta_0 \text{ (params)} \\
            &\textbf{initialize}: m_0 \leftarrow 0, \; v_0 \leftarrow 0, \; k \leftarrow 0 \\
            &\textbf{on each step where } \theta \textbf{ has a gradient } g
                \; (g \leftarrow -g \text{ if maximize}): \\
            &\quad k \leftarrow k + 1 \\
            &\quad \beta_{1,k} \leftarrow 1 - 1/\ln(k + 2) \text{ if logarithmic\_schedule
                else } \beta_1 \\
            &\quad m_k \leftarrow \beta_{1,k} m_{k-1} + (1 - \beta_{1,k}) g \\
            &\quad v_k \leftarrow \beta_2 v_{k-1} + (1 - \beta_2)\,
                \mathrm{sign}(g^2 - v_{k-1})\, g^2 \\
            &\quad \hat v_k \leftarrow v_k / (1 - \beta_2^k) \\
            &\quad \theta_k \leftarrow \theta_{k-1}(1 - \eta\lambda)
                - \eta\, |g|\, \mathrm{sign}(m_k) / (\sqrt{\hat v_k} + \epsilon) \\
       \end{aligned}

    with :math:`\mathrm{sign}(0) = 0`. The step count :math:`k` is kept per parameter tensor
    (``state["step"]``), so a tensor without a gradient on a step keeps its state unchanged.
    The momentum carries no bias correction; the second moment does.

    Args:
        params (iterable): parameters or named parameters to optimize, or dicts defining
            parameter groups. Every argument below is also a per-group option.
        lr (float or Tensor, optional): learning rate :math:`\eta`, finite and ``>= 0``; a
            1-element tensor lets schedulers and ``torch.compile`` change it without
            recompiling (default: ``1e-4``).
        betas (tuple[float, float], optional): :math:`\beta_1 \in [0, 1)` for the momentum
            (unused when ``logarithmic_schedule=True``) and :math:`\beta_2 \in [0.5, 1)` for the
            second moment (default: ``(0.92, 0.99)``).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda \ge 0`, applied
            as :math:`\theta \leftarrow \theta (1 - \eta\lambda)` (default: ``0.0``).
        eps (float, optional): :math:`\epsilon > 0`, added outside the square root
            (default: ``1e-8``).
        logarithmic_schedule (bool, optional): use Anolog's momentum schedule
            :math:`\beta_{1,k} = 1 - 1/\ln(k + 2)` (default: ``False``).
        maximize (bool, optional, keyword-only): maximize the objective instead of minimizing
            it (default: ``False``).
        fused (bool or None, optional, keyword-only): ``True`` runs the operator
            ``ano::fused_step_``, which reads and writes each value once and takes
            ``torch.amp.GradScaler``'s scale and inf flag. On CPU, float32 parameters (float32,
            bfloat16 or 8-bit state) go through its C++ kernel, built on first use with
            ``torch.utils.cpp_extension`` (seconds, then cached on disk), one call for all the
            optimizer's groups; everything else (GPU, other dtypes) through its torch
            implementation, a multi-tensor ``foreach`` step. See :mod:`ano_optimizer.fused`
            (default: ``None``, not fused).
        capturable (bool, optional, keyword-only): keep each step count on its parameter's
            device and compute the per-step scalars there, so that ``step()`` never reads a
            device value on the host and can be captured in a CUDA graph
            (``torch.cuda.graph``) after a few warm-up steps, on every path. A float ``lr`` is
            frozen into a captured graph; to change it between replays pass ``lr`` as a tensor
            on the parameters' device (schedulers then update it in place). Costs a few tiny
            kernels per step, so leave it off unless you capture (default: ``False``).
        state_dtype (torch.dtype or None, optional, keyword-only): dtype of ``exp_avg`` and
            ``exp_avg_sq``; ``torch.bfloat16`` halves the optimizer's memory, with the math in
            float32 and stochastic rounding on write-back. ``torch.uint8`` keeps blockwise
            8-bit codes with a float32 scale per block of 256 values of a row, about a quarter
            of float32 state, for tensors of 2+ dimensions, 4096+ values and rows of 16+ (the
            others keep float32 moments; :mod:`ano_optimizer.blockwise8`). ``None`` keeps the
            parameter's dtype (default: ``None``).
        foreach (bool or None, optional, keyword-only): ``True`` uses the multi-tensor
            ``torch._foreach_*`` path, ``False`` the single-tensor path; ``None`` picks per
            device: foreach on CUDA and other accelerators; on CPU, where it measured faster,
            the cache-blocked single-tensor path for tensors of at least 128 K elements and
            foreach for the smaller ones (default: ``None``). All paths agree bit for bit.

    Complex parameters are optimized as pairs of real numbers, as :class:`torch.optim.Adam`
    does. Sparse gradients are rejected.

    Examples:
        >>> import torch
        >>> from ano_optimizer import Ano
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = Ano(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> optimizer.step()
        >>> optimizer.zero_grad()
        >>> int(optimizer.state[model.weight]["step"])
        1
    """


class Anolog(Ano):
    r"""Anolog: :class:`Ano` with the logarithmic momentum schedule
    :math:`\beta_{1,k} = 1 - 1/\ln(k + 2)` (0.09, 0.28, 0.38, ... at steps 1, 2, 3).

    Same arguments as :class:`Ano` without ``logarithmic_schedule``; ``betas[0]`` is accepted
    for compatibility and unused.

    Examples:
        >>> import torch
        >>> from ano_optimizer import Anolog
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = Anolog(model.parameters(), lr=1e-3)
        >>> optimizer.param_groups[0]["logarithmic_schedule"]
        True
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = hp.DEFAULT_LR,
        betas: tuple[float, float] = hp.DEFAULT_BETAS,
        weight_decay: float = hp.DEFAULT_WEIGHT_DECAY,
        eps: float = hp.DEFAULT_EPS,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            weight_decay,
            eps,
            True,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            state_dtype=state_dtype,
        )


def ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    capturable: bool = False,
    exp_avg_scales: list[Tensor | None] | None = None,
    exp_avg_sq_scales: list[Tensor | None] | None = None,
) -> None:
    r"""Functional API that performs the Ano/Anolog update in place; see :class:`Ano`.

    The hyper-parameters and every tensor are checked before any of them changes, with the
    errors :class:`Ano` raises (a tensor is named by its index in the lists). With
    ``capturable=True`` the ``state_steps`` must be on their parameters' devices and a tensor
    ``lr`` too; the fused path reads them there always. For 8-bit moments
    (``state_dtype=torch.uint8``: ``torch.uint8`` codes in ``exp_avgs``/``exp_avg_sqs``),
    ``exp_avg_scales`` and ``exp_avg_sq_scales`` hold each tensor's block scales (None for a
    tensor with float moments); see :mod:`ano_optimizer.blockwise8`.
    """
    compiling = torch.compiler.is_compiling()
    # torch.optim's has_complex is a hint the caller may leave False: the tensors decide, so
    # that a complex list never reaches real-only kernels after its step counts have moved.
    has_complex = has_complex or any(torch.is_complex(p) for p in params)
    if not compiling:
        owner = "ano"
        check_group_options(
            {
                "lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay,
                "logarithmic_schedule": logarithmic_schedule, "maximize": maximize,
                "foreach": foreach, "fused": fused, "capturable": capturable,
                "state_dtype": None,
            },
            owner,
            read_tensor_lr=False,
        )  # fmt: skip
        if not fused and (grad_scale is not None or found_inf is not None):
            raise ValueError("ano: grad_scale and found_inf are only supported with fused=True")
        scales = _functional_scales(params, exp_avg_scales, exp_avg_sq_scales)
        # FSDP2 and tensor parallel hand in DTensors: every path runs on their local shards.
        params, grads, exp_avgs, exp_avg_sqs = _local_shard_lists(
            params, grads, exp_avgs, exp_avg_sqs
        )
        if not fused:
            # (The fused path lets its CPU kernel check the tensors, and checks the rest.)
            grads = check_step_tensors(
                params, grads, exp_avgs, exp_avg_sqs, state_steps, owner=owner, where=_tensor,
                scales=scales,
            )  # fmt: skip
            if capturable:
                for i, (p, step) in enumerate(zip(params, state_steps, strict=True)):
                    _check_capturable(p, lr, step, owner, lambda k=i: _tensor(k))
    else:
        scales = _functional_scales(params, exp_avg_scales, exp_avg_sq_scales)
    with torch_function_subclasses_off((params, grads, exp_avgs, exp_avg_sqs)):
        _ano_group(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, scales=scales, foreach=foreach,
            fused=fused, grad_scale=grad_scale, found_inf=found_inf, has_complex=has_complex,
            beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
            logarithmic_schedule=logarithmic_schedule, maximize=maximize, capturable=capturable,
            checked=not fused, owner="ano", where=_tensor,
        )  # fmt: skip


def _tensor(i: int) -> str:
    return f"tensor {i}"


def _functional_scales(params, exp_avg_scales, exp_avg_sq_scales):
    """:meth:`Ano._scales` for the functional API's lists: None without 8-bit moments."""
    if exp_avg_scales is None and exp_avg_sq_scales is None:
        return None
    if exp_avg_scales is None or exp_avg_sq_scales is None:
        raise ValueError("ano: give both exp_avg_scales and exp_avg_sq_scales, or neither")
    if not len(exp_avg_scales) == len(exp_avg_sq_scales) == len(params):
        raise ValueError("ano: exp_avg_scales and exp_avg_sq_scales need one entry per parameter")
    return [
        None
        if m is None and v is None
        else (*_local_shards(m, v), local_shard_offset(p))
        if m is not None and v is not None
        else _missing_scale(i)
        for i, (p, m, v) in enumerate(zip(params, exp_avg_scales, exp_avg_sq_scales, strict=True))
    ]


def _missing_scale(i: int):
    raise ValueError(f"ano: tensor {i} has one of its two moment scales; give both or neither")


def _ano_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    scales: list[tuple[Tensor, Tensor] | None] | None = None,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    capturable: bool,
    checked: bool,
    owner: str,
    where: Callable[[int], str],
) -> None:
    """Pick the execution path for one group's (checked) tensors and run it."""
    scalars = {
        "beta1": beta1,
        "beta2": beta2,
        "lr": lr,
        "weight_decay": weight_decay,
        "eps": eps,
        "logarithmic_schedule": logarithmic_schedule,
        "maximize": maximize,
    }
    if fused:
        fused_ano(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, grad_scale=grad_scale,
            found_inf=found_inf, scales=scales, has_complex=has_complex, checked=checked,
            owner=owner, where=where, **scalars,
        )  # fmt: skip
        return
    if scales is not None and any(s is not None for s in scales):
        # 8-bit moments, not fused: the operator's torch implementation steps those tensors.
        coded = [i for i, s in enumerate(scales) if s is not None]
        lists = FusedLists(params, grads, exp_avgs, exp_avg_sqs, state_steps, scales)
        fused_step_checked_(*lists.subset(coded).arguments(), **scalars)
        rest = [i for i, s in enumerate(scales) if s is None]
        params, grads, exp_avgs, exp_avg_sqs, state_steps = (
            [t[i] for i in rest] for t in (params, grads, exp_avgs, exp_avg_sqs, state_steps)
        )
        if not params:
            return
        has_complex = has_complex and any(p.is_complex() for p in params)
    if any(
        m.dtype != p.dtype or v.dtype != p.dtype
        for p, m, v in zip(params, exp_avgs, exp_avg_sqs, strict=True)
    ) or (
        # A capturable step's scalars are device tensors, which bfloat16/float16 arithmetic
        # would round to 8 or 11 bits (1 - lr·λ = 0.999 becomes 1): compute in float32 instead.
        capturable and any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    ):
        _float32_math_ano(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable, **scalars
        )
        return
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if torch.compiler.is_compiling():
        # Under torch.compile the single-tensor expressions fuse into one kernel anyway.
        _single_tensor_ano(*tensors, capturable=False, **scalars)
        return
    if foreach is None:
        foreach = default_foreach(params)
        if not foreach:
            # CPU default: tensors smaller than one block gain nothing from blocking and pay
            # ~12 Python-dispatched operations each, so they go through the foreach path in one
            # batch; the paths agree bit for bit, so the split does not change any result.
            small = [p.numel() < _CHUNK_NUMEL for p in params]
            small_ones, large_ones = (
                [[t for t, s in zip(ts, small, strict=True) if s == wanted] for ts in tensors]
                for wanted in (True, False)
            )
            if small_ones[0]:
                _multi_tensor_ano(
                    *small_ones, has_complex=has_complex, capturable=capturable, **scalars
                )
            if large_ones[0]:
                _single_tensor_ano(*large_ones, capturable=capturable, **scalars)
            return
    if foreach:
        _multi_tensor_ano(*tensors, has_complex=has_complex, capturable=capturable, **scalars)
    else:
        _single_tensor_ano(*tensors, capturable=capturable, **scalars)


def _momentum_weight(step, beta1: float, logarithmic_schedule: bool):
    """``1 - beta1_k``: the weight of the new gradient in the momentum at step ``step``."""
    if not logarithmic_schedule:
        return 1.0 - beta1
    log = torch.log if isinstance(step, Tensor) else math.log
    return 1.0 / log(step + 2)


def _step_count(step_t: Tensor, *, compiling: bool, capturable: bool):
    """The step count that a step's scalars are computed from: normally a Python number read
    from the tensor; under ``torch.compile`` the tensor itself (traced); with ``capturable`` the
    tensor in float64 on its own device, so nothing is read on the host and the scalars equal
    those computed from the Python number."""
    if compiling:
        return step_t
    if capturable:
        return step_t.to(torch.float64)
    return step_t.item()


def _lr_value(lr, *, compiling: bool, capturable: bool):
    """The learning rate as the update uses it, following :func:`_step_count`: a tensor ``lr``
    becomes a Python number, stays traced under ``torch.compile``, and with ``capturable`` is
    widened to float64 on its own device (the same arithmetic as the number, no host read).
    A tensor of any 1-element shape acts as its 0-d view, which a scheduler's in-place updates
    still reach."""
    if not isinstance(lr, Tensor):
        return lr
    lr = lr.reshape(())
    if compiling:
        return lr
    return lr.to(torch.float64) if capturable else lr.item()


def _stepped_tensors(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    *,
    capturable,
    beta1,
    beta2,
    lr,
    weight_decay,
    eps,
    logarithmic_schedule,
):
    """For each parameter in turn: increment its step, then yield its four tensors (complex ones
    as their real views), the scalar keyword arguments of :func:`_ano_update_` for that step,
    and the step count (a number, or a tensor under ``capturable`` or ``torch.compile``). The
    per-tensor loop of the single-tensor and the float32-math paths."""
    compiling = torch.compiler.is_compiling()
    lr = _lr_value(lr, compiling=compiling, capturable=capturable)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        if torch.is_complex(param):
            # A real state (state_dtype) of a complex parameter is its real view already.
            param, grad, exp_avg, exp_avg_sq = (
                torch.view_as_real(t) if t.is_complex() else t
                for t in (param, grad, exp_avg, exp_avg_sq)
            )
        step_t += 1
        step = _step_count(step_t, compiling=compiling, capturable=capturable)
        yield (
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            {
                "momentum_weight": _momentum_weight(step, beta1, logarithmic_schedule),
                "beta2": beta2,
                "lr": lr,
                "weight_decay": weight_decay,
                "eps": eps,
                "bias_correction2_sqrt": (1.0 - beta2**step) ** 0.5,
            },
            step,
        )


def _ano_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    momentum_weight,
    beta2: float,
    lr,
    weight_decay: float,
    eps: float,
    bias_correction2_sqrt,
) -> None:
    """The elementwise update on one block of equal-shaped tensors; ``a``, ``b`` are scratch.

    ``sqrt(v̂) + ε`` is computed as ``(sqrt(v) + ε·c) / c`` with ``c = sqrt(1 - β2^k)``, and
    ``β2·v + (1-β2)·x`` as ``lerp(v, x, 1-β2)``: equal to the spec's expressions up to rounding,
    with fewer passes over memory and no scalar-tensor temporaries.
    """
    torch.mul(grad, grad, out=a)
    torch.sub(a, exp_avg_sq, out=b).sign_()  # sign(g² - v) from the previous v
    exp_avg_sq.lerp_(b.mul_(a), 1.0 - beta2)
    lerp_(exp_avg, grad, momentum_weight)
    torch.sqrt(exp_avg_sq, out=a).add_(eps * bias_correction2_sqrt)
    torch.div(grad, a, out=a).abs_()  # c·|g| / (sqrt(v̂) + ε): the denominator is positive
    torch.sign(exp_avg, out=b)
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    step_size = lr * bias_correction2_sqrt
    if isinstance(step_size, Tensor):
        # Rounds lr·c·ratio before the fused multiply-add, exactly as the number form does.
        param.addcmul_(a.mul_(step_size), b, value=-1.0)
    else:
        param.addcmul_(a, b, value=-step_size)


def _narrow_store(source: Tensor, target: Tensor, step, stream: int, start: int) -> None:
    if target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        parameters = (
            rounding.noise_parameter_tensor(step, stream)
            if isinstance(step, Tensor)
            else rounding.noise_parameters(step, stream)
        )
        noise = rounding.hashed_noise(source, parameters, start)
        target.copy_(rounding.round_with_noise(source, noise))
    else:
        target.copy_(source)


def _float32_math_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    capturable: bool = False,
) -> None:
    """The float32-math path: the eager update for state stored in another dtype than the
    parameter (``state_dtype``), and for bfloat16/float16 parameters with ``capturable``.

    Per block of at most ``_BLOCK_NUMEL`` elements (per tensor where the tensors are not all
    contiguous): widen the parameter, gradient and moments to the widest of their dtypes (at
    least float32), run the single-tensor path's update on them, and write the results back
    (stochastic rounding into bfloat16).
    """
    stepped = _stepped_tensors(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable, beta1=beta1,
        beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        logarithmic_schedule=logarithmic_schedule,
    )  # fmt: skip
    for param, grad, exp_avg, exp_avg_sq, scalars, step in stepped:
        compute = torch.float32
        for t in (param, exp_avg, exp_avg_sq):
            compute = torch.promote_types(compute, t.dtype)
        tensors = (param, grad, exp_avg, exp_avg_sq)
        if flattens(tensors):
            blocks = zip(*(t.view(-1).split(_BLOCK_NUMEL) for t in tensors), strict=True)
        else:
            blocks = iter([tensors])  # as laid out; noise follows the elements' logical order
        for index, (p, g, m, v) in enumerate(blocks):
            p32, g32 = p.to(compute), g.to(compute)
            m32, v32 = m.to(compute), v.to(compute)
            if maximize:
                g32 = g32.neg()
            a, b = torch.empty_like(p32), torch.empty_like(p32)
            _ano_update_(p32, g32, m32, v32, a, b, **scalars)
            p.copy_(p32)
            start = index * _BLOCK_NUMEL
            _narrow_store(m32, m, step, rounding.EXP_AVG_STREAM, start)
            _narrow_store(v32, v, step, rounding.EXP_AVG_SQ_STREAM, start)


def _local_shards(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The local shards of DTensors that share one mesh and placement, else ``tensors`` as given.

    The update is elementwise, so the shard of the update is the update of the shard: on the
    local tensors every execution path runs unchanged. (A DTensor cannot even be flattened
    when a dimension does not divide evenly over the ranks, as with FSDP2's uneven shards.)
    Partial placements hold unreduced values, so those stay DTensors and DTensor reduces them.
    """
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(tensors[0], dtensor):
        return tensors
    layout = (tensors[0].device_mesh, tensors[0].placements)
    if any(p.is_partial() for p in layout[1]) or not all(
        isinstance(t, dtensor) and (t.device_mesh, t.placements) == layout for t in tensors
    ):
        return tensors
    return tuple(t.to_local() for t in tensors)


def _local_shard_lists(*lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    """:func:`_local_shards` applied to each parameter's tensors across parallel lists."""
    dtensor = dtensor_class()
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in set(map(type, lists[0]))):
        return lists  # the common case costs one pass over the types
    columns = [_local_shards(*tensors) for tensors in zip(*lists, strict=True)]
    return tuple(list(column) for column in zip(*columns, strict=True))


def _single_tensor_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    capturable: bool,
) -> None:
    compiling = torch.compiler.is_compiling()
    scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    stepped = _stepped_tensors(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable, beta1=beta1,
        beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        logarithmic_schedule=logarithmic_schedule,
    )  # fmt: skip
    for param, grad, exp_avg, exp_avg_sq, scalars, _ in stepped:
        blocked = not compiling and flattens((param, grad, exp_avg, exp_avg_sq))
        if not blocked:
            if maximize:
                grad = -grad
            a, b = torch.empty_like(param), torch.empty_like(param)
            _ano_update_(param, grad, exp_avg, exp_avg_sq, a, b, **scalars)
            continue

        key = (param.device, param.dtype)
        if key not in scratch:
            buffer = torch.empty(3 * _CHUNK_NUMEL, device=param.device, dtype=param.dtype)
            scratch[key] = buffer.split(_CHUNK_NUMEL)
        chunks = zip(
            *(t.view(-1).split(_CHUNK_NUMEL) for t in (param, grad, exp_avg, exp_avg_sq)),
            strict=True,
        )
        for p, g, m, v in chunks:
            a, b, c = scratch[key]
            if p.numel() != _CHUNK_NUMEL:
                a, b, c = a[: p.numel()], b[: p.numel()], c[: p.numel()]
            if maximize:
                g = torch.neg(g, out=c)
            _ano_update_(p, g, m, v, a, b, **scalars)


def _buckets(indices: list[int], numels: list[int]) -> Iterable[list[int]]:
    bucket: list[int] = []
    total = 0
    for i in indices:
        if bucket and total + numels[i] > _FOREACH_BUCKET_NUMEL:
            yield bucket
            bucket, total = [], 0
        bucket.append(i)
        total += numels[i]
    if bucket:
        yield bucket


def _multi_tensor_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    capturable: bool,
) -> None:
    lr = _lr_value(lr, compiling=False, capturable=capturable)
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device, _), tensors in grouped.items():
        dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps = tensors
        if has_complex:
            _as_real(dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs)
        torch._foreach_add_(dev_steps, 1.0)
        if capturable:
            # 0-d float64 tensors on the device, from a handful of foreach kernels.
            weights, corrections = per_tensor_scalars(
                dev_steps, beta1, beta2, logarithmic_schedule, torch.float64, device
            )
        else:
            steps = [s.item() for s in dev_steps]
            weights = [_momentum_weight(s, beta1, logarithmic_schedule) for s in steps]
            corrections = [(1.0 - beta2**s) ** 0.5 for s in steps]
        numels = [p.numel() for p in dev_params]
        for idx in _buckets(list(range(len(dev_params))), numels):
            _foreach_ano_update_(
                [dev_params[i] for i in idx],
                [dev_grads[i] for i in idx],
                [dev_exp_avgs[i] for i in idx],
                [dev_exp_avg_sqs[i] for i in idx],
                [weights[i] for i in idx],
                [corrections[i] for i in idx],
                beta1=beta1,
                beta2=beta2,
                lr=lr,
                weight_decay=weight_decay,
                eps=eps,
                logarithmic_schedule=logarithmic_schedule,
                maximize=maximize,
            )


def _foreach_ano_update_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    weights,
    corrections,
    *,
    beta1,
    beta2,
    lr,
    weight_decay,
    eps,
    logarithmic_schedule,
    maximize,
) -> None:
    """:func:`_ano_update_` over lists, operation for operation. ``weights`` (``1 - β1_k``) and
    ``corrections`` (``sqrt(1 - β2^k)``) hold one Python number or one 0-d device tensor per
    tensor (``capturable``)."""
    on_device = isinstance(corrections[0], Tensor)
    if maximize:
        grads = torch._foreach_neg(grads)
    a = torch._foreach_mul(grads, grads)
    b = torch._foreach_sub(a, exp_avg_sqs)
    torch._foreach_sign_(b)
    torch._foreach_mul_(b, a)
    torch._foreach_lerp_(exp_avg_sqs, b, 1.0 - beta2)
    del a, b
    if logarithmic_schedule:
        foreach_lerp_(exp_avgs, grads, weights)
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if on_device:
        torch._foreach_add_(denom, torch._foreach_mul(corrections, eps))
    else:
        torch._foreach_add_(denom, [eps * c for c in corrections])
    ratio = torch._foreach_div(grads, denom)
    del denom
    torch._foreach_abs_(ratio)
    direction = torch._foreach_sign(exp_avgs)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if on_device:
        # Rounds lr·c·ratio before the fused multiply-add, exactly as the number form does.
        torch._foreach_mul_(ratio, torch._foreach_mul(corrections, lr))
        torch._foreach_addcmul_(params, ratio, direction, value=-1.0)
    else:
        torch._foreach_addcmul_(params, ratio, direction, [-lr * c for c in corrections])


def _as_real(params: list[Tensor], *others: list[Tensor]) -> None:
    """Replace each complex parameter, and the tensors at its index in ``others``, by their real
    views, in place in the lists."""
    for i, param in enumerate(params):
        if torch.is_complex(param):
            params[i] = torch.view_as_real(param)
            for tensors in others:
                tensors[i] = torch.view_as_real(tensors[i])
