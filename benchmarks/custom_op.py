"""Handing tensor lists to the fused CPU kernel through torch's supported extension APIs, against
the shipped front end.

    python -m benchmarks.custom_op [--sets resnet50 gpt2-small] [--rounds 20] [--threads 2]
                                   [--output benchmarks/results/custom_op.json]

The shipped kernel (``ano_optimizer/fused/cpu_kernel.cpp``) reads the tensors from the Python
lists itself, through a mirror of torch's ``THPVariable`` layout, and is built by Inductor's C++
loader. Each alternative compiles the very same source (its checks and its update over
``TensorImpl`` s) with another front end, built by ``torch.utils.cpp_extension.load_inline``:

- ``torch.library op``: ``TORCH_LIBRARY`` operator ``ano_bench::step`` taking ``Tensor[]``
  lists, called as ``torch.ops.ano_bench.step``;
- ``cpp_extension module``: a pybind11 function taking ``std::vector<at::Tensor>``.

Measured per front end: the first fused step of a fresh process with an empty build cache (the
build included) and with the cache of that process; the whole ``step()`` on 161 one-element
tensors, hot and after a cache flush (as ``benchmarks/step_overhead.py``); and the step time on
each parameter set against ``AdamW(fused=True)``, rows interleaved and ratios paired within
rounds (as ``benchmarks/fused_step.py``). Every front end's results are checked against the
shipped kernel's, bit for bit, before anything is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from ano_optimizer import Ano
from ano_optimizer import fused as fused_dispatch
from ano_optimizer.fused import cpu
from benchmarks import step_overhead
from benchmarks.fused_step import paired_ratio, time_rows
from benchmarks.shapes import PARAMETER_SETS

_CHECKS_AND_UPDATE = r"""
// Shared by both front ends: the lists as TensorImpls, checked and updated by the shipped code.
template <typename List>
bool ano_step(
    const List* lists, double lr, double momentum_weight, double beta2, double eps,
    double weight_decay, double inv_scale, int64_t skip, int64_t block, int64_t maximize,
    int64_t log, int64_t check_only, bool release_gil) {
    const int64_t tensors = static_cast<int64_t>(lists[0].size());
    for (int k = 1; k < 5; ++k)
        if (static_cast<int64_t>(lists[k].size()) != tensors)
            throw std::runtime_error("5 lists of one tensor per parameter");
    std::vector<c10::TensorImpl*> impls(5 * tensors);
    std::vector<char> coded(tensors, 0);  // float moments: no codes
    const auto impl_of = [&](int64_t k, int64_t t, c10::ScalarType dtype) {
        return impl_taken(lists[k][t].unsafeGetTensorImpl(), dtype, k != 1);
    };
    const auto absent = [](int64_t, int64_t) { return false; };
    if (!checked_group(tensors, impls, coded, impl_of, absent)) return false;
    if (skip || check_only) return true;
    // The schema's floats are doubles: rounded to float32 here as the shipped binding does.
    const auto update = [&] {
        update_group(
            tensors, impls, coded, std::vector<int64_t>(tensors, 0), static_cast<float>(lr),
            static_cast<float>(momentum_weight),
            static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
            static_cast<float>(inv_scale), block, maximize, log);
    };
    if (release_gil) {
        Py_BEGIN_ALLOW_THREADS
        update();
        Py_END_ALLOW_THREADS
    } else {
        update();
    }
    return true;
}
"""

# The torch headers come after the shipped source, which includes Python.h first, as it must be.
_LIBRARY_OP = (
    "{source}"
    + r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
"""
    + _CHECKS_AND_UPDATE
    + r"""
bool library_step(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double momentum_weight,
    double beta2, double eps, double weight_decay, double inv_scale, int64_t skip, int64_t block,
    int64_t maximize, int64_t log, int64_t check_only) {
    const at::TensorList lists[5] = {params, grads, exp_avgs, exp_avg_sqs, steps};
    // An operator called from Python runs without the GIL already.
    return ano_step(lists, lr, momentum_weight, beta2, eps, weight_decay, inv_scale, skip, block,
                    maximize, log, check_only, false);
}

TORCH_LIBRARY(ano_bench, m) {
    m.def("step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
          "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float momentum_weight, "
          "float beta2, float eps, float weight_decay, float inv_scale, int skip, int block, "
          "int maximize, int log, int check_only) -> bool");
}

TORCH_LIBRARY_IMPL(ano_bench, CPU, m) { m.impl("step", &library_step); }
"""
)

_PYBIND_MODULE = (
    "{source}"
    + r"""
#include <torch/extension.h>
"""
    + _CHECKS_AND_UPDATE
    + r"""
bool module_step(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<at::Tensor>& steps, double lr, double momentum_weight, double beta2,
    double eps, double weight_decay, double inv_scale, int64_t skip, int64_t block,
    int64_t maximize, int64_t log, int64_t check_only) {
    const std::vector<at::Tensor> lists[5] = {params, grads, exp_avgs, exp_avg_sqs, steps};
    return ano_step(lists, lr, momentum_weight, beta2, eps, weight_decay, inv_scale, skip, block,
                    maximize, log, check_only, true);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("step", &module_step); }
"""
)

FRONT_ENDS = ("torch.library op", "cpp_extension module")
# The shipped build's flags (ano_optimizer._torch_internals.build_cpu_kernel, Inductor's C++
# defaults for this machine) as far as they change the generated code.
_FLAGS = [
    "-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-ftree-loop-vectorize",
    "-fno-math-errno", "-DSTATE_T=float",
]  # fmt: skip


def build(front_end: str):
    """Build (or load from ``TORCH_EXTENSIONS_DIR``) one front end; return its step callable."""
    from torch.utils.cpp_extension import load_inline

    source = (resources.files("ano_optimizer.fused") / "cpu_kernel.cpp").read_text()
    template = _LIBRARY_OP if front_end == "torch.library op" else _PYBIND_MODULE
    code = template.replace("{source}", source)
    name = "ano_bench_library" if front_end == "torch.library op" else "ano_bench_module"
    built = load_inline(
        name,
        cpp_sources=[code],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=front_end != "torch.library op",
    )
    return torch.ops.ano_bench.step if front_end == "torch.library op" else built.step


@contextlib.contextmanager
def front_end(step) -> Iterator[None]:
    """Run the enclosed ``fused=True`` float32-state CPU steps through ``step`` instead of the
    shipped front end (same checks, same update, same dispatch around it)."""
    shipped = fused_dispatch._cpu_group_call

    def call(state_dtype, lists, scalars, maximize, log, check_only=False) -> bool:
        if state_dtype != torch.float32:
            return False
        return bool(
            step(*lists, *scalars, cpu._CPU_BLOCK, int(maximize), int(log), int(check_only))
        )

    fused_dispatch._cpu_group_call = call
    try:
        yield
    finally:
        fused_dispatch._cpu_group_call = shipped


class AnoThrough:
    """``Ano(fused=True)`` whose steps go through another front end."""

    def __init__(self, params, step, **options):
        self.optimizer = Ano(params, lr=1e-4, fused=True, **options)
        self._step = step

    def step(self):
        with front_end(self._step):
            self.optimizer.step()


def check_same_results(step) -> None:
    """12 steps of both front ends on odd shapes, with Anolog and decay: the same bits."""
    shapes = [(5,), (33, 7), (1,), (3, 16384 + 5), (16384,), (0,)]
    results = []
    for through in (None, step):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        optimizer = Ano(params, lr=1e-2, weight_decay=0.1, fused=True, logarithmic_schedule=True)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with front_end(through) if through else contextlib.nullcontext():
                optimizer.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        if not torch.equal(a, b):
            raise AssertionError("the front end's results differ from the shipped kernel's")


_FIRST_STEP = """
import sys, time, torch
torch.set_num_threads({threads})
from ano_optimizer import Ano
from benchmarks.custom_op import AnoThrough, build
from benchmarks.shapes import PARAMETER_SETS
from benchmarks.step_time import make_params
params = make_params(PARAMETER_SETS["resnet50"]())
start = time.perf_counter()
if {front_end!r} == "shipped":
    opt = Ano(params, lr=1e-4, fused=True)
else:
    opt = AnoThrough(params, build({front_end!r}))
opt.step()
print(time.perf_counter() - start)
"""


def first_step_seconds(front_end_name: str, threads: int, cache: str) -> float:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP.format(threads=threads, front_end=front_end_name)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["resnet50", "gpt2-small"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/custom_op.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"threads": args.threads, "torch": torch.__version__, "first_step_s": {}}

    print("first fused step on the ResNet-50 set, fresh processes:", flush=True)
    for name in ("shipped", *FRONT_ENDS):
        with tempfile.TemporaryDirectory() as cache:
            cold = first_step_seconds(name, args.threads, cache)
            warm = first_step_seconds(name, args.threads, cache)
        report["first_step_s"][name] = {"empty_cache": cold, "warm_cache": warm}
        print(f"  {name}: {cold:.1f} s with an empty cache, {warm:.1f} s warm", flush=True)

    steps = {name: build(name) for name in FRONT_ENDS}
    for step in steps.values():
        check_same_results(step)
    print("every front end gives the shipped kernel's bits", flush=True)

    rows = {
        "Ano fused=True (shipped front end)": lambda ps: Ano(ps, lr=1e-4, fused=True),
        **{f"Ano fused=True ({name})": (lambda s: lambda ps: AnoThrough(ps, s))(step)
           for name, step in steps.items()},
        "AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }  # fmt: skip
    overhead = step_overhead.measure(161, 60, rows)
    report["step_overhead_us"] = overhead
    print(step_overhead.markdown(overhead, 161, 60), flush=True)

    report["sets"] = {}
    for name in args.sets:
        shapes = PARAMETER_SETS[name]()
        times = time_rows(shapes, args.rounds, rows, tag=f"[{name}]")
        adamw = times["AdamW fused=True"]
        report["sets"][name] = {
            label: {"median_ms": statistics.median(t), "x_adamw_fused": paired_ratio(t, adamw)}
            for label, t in times.items()
        }
        print(f"{name}: median ms/step, × AdamW fused (paired)", flush=True)
        for label, row in report["sets"][name].items():
            print(f"  {label}: {row['median_ms']:.1f} ms, {row['x_adamw_fused']:.2f}×")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
