"""One prepared GPU check of the fused path (a few minutes on one CUDA device).

    python -m benchmarks.gpu_check [--billions 1.0] [--output gpu_check.json] [--device cpu]

1. Equivalence on CUDA: fused vs the single-tensor path over 12 steps, float32 params (moments
   to float32 precision, rtol 1e-5 / atol 1e-6, parameters within the sign-flip budget of
   tests/test_fused.py), and bfloat16 state against float32 state.
2. A training step under ``torch.compile`` with ``fused=True``: one graph, no graph break, the
   eager fused step's results, and no recompilation for new learning rates and steps.
3. GradScaler on CUDA: an inf gradient skips the step without a host sync in the kernel.
4. CUDA-graph capture with ``capturable=True`` on the single-tensor, foreach, fused and
   bfloat16-state paths: a step captured after warm-up and replayed with new gradients and a
   scheduled device learning rate against the same steps run eagerly.
5. Step time on ResNet-50's 161 tensors, where launches cost most: ``fused=True`` (the
   operator's multi-tensor torch implementation: one foreach launch per operation for a
   bucket of tensors), ``foreach=True`` and ``AdamW(fused=True)``.
6. 8-bit state: ``fused=True`` on CUDA against the same step on the CPU's C++ kernel
   (``check_8bit``).
7. Bandwidth on ~1 B parameters (64 tensors of rows of 1024): GB/s of fused Ano (float32,
   bfloat16 and 8-bit state), ``AdamW(fused=True)`` and a compiled 4-read/3-write copy kernel,
   timed with CUDA events.
Prints each result as it goes and writes them all as JSON; exits 1 if a check fails.
``--device cpu`` runs checks 1-3 only, as a smoke test of this script (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from ano_optimizer import Ano
from ano_optimizer.optimizer import ano

HYPER = {
    "lr": 1e-2,
    "beta1": 0.9,
    "beta2": 0.99,
    "eps": 1e-8,
    "weight_decay": 0.05,
    "logarithmic_schedule": False,
    "maximize": False,
}
SHAPES = [(5,), (33, 7), (4, 3, 1, 3), (1,), (300, 300)]


def _run(params, grads, fused, state_dtype=None, steps=12, **overrides):
    hyper = {**HYPER, **overrides}
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    v = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    k = [torch.zeros((), device=p.device) for p in params]
    for s in range(steps):
        ano(params, grads[s], m, v, k, fused=fused, foreach=False, **hyper)
    return params, m, v, k


def _run_optimizer(factory, params, grads, steps=12):
    """:func:`_run` through an optimizer object built by ``factory(params, **options)``."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = factory(
        params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )  # fmt: skip
    for s in range(steps):
        for p, g in zip(params, grads[s], strict=True):
            p.grad = g
        optimizer.step()
    state = [optimizer.optimizer.state[p] for p in params]
    return (
        [p.detach() for p in params],
        [s["exp_avg"] for s in state],
        [s["exp_avg_sq"] for s in state],
        [s["step"] for s in state],
    )


def _moment_excess(pairs) -> float:
    """The largest ``|a - b| / (atol + rtol·|b|)`` over moment pairs, with the tolerances of
    tests/test_fused.py (rtol 1e-5, atol 1e-6): at most 1 means within float32 precision. (A
    purely relative error blows up where a moment is within rounding of 0.)"""
    return max(((a - b).abs() / (1e-6 + 1e-5 * b.abs())).max().item() for a, b in pairs)


def check_equivalence(device) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, device=device, generator=gen) for s in SHAPES] for _ in range(12)]
    fused, eager = _run(params, grads, True), _run(params, grads, False)
    moment_excess = _moment_excess(
        pair for i in (1, 2) for pair in zip(fused[i], eager[i], strict=True)
    )
    total = sum(p.numel() for p in params)
    off = sum(int(((f - e).abs() > 1e-5).sum()) for f, e in zip(fused[0], eager[0], strict=True))
    low = _run(params, grads, True, state_dtype=torch.bfloat16)
    v_bias = max(
        abs((lo.float().sum() - f.sum()) / f.sum()).item()
        for lo, f in zip(low[2], fused[2], strict=True)
        if f.numel() > 1000
    )
    ok = moment_excess <= 1 and off <= 0.01 * total and v_bias < 0.01
    return {
        "ok": ok,
        "moment_excess": moment_excess,
        "param_coords_off": off,
        "of": total,
        "bf16_v_bias": v_bias,
    }


def check_compiled_step(device) -> dict:
    """``optimizer.step`` of a fused Ano under ``torch.compile(fullgraph=True)`` against the
    same steps run eagerly: one graph (a graph break would raise), no recompilation as a tensor
    learning rate changes, and the eager results (bit for bit where the graph calls the same
    kernel: the CPU; to float32 rounding where Inductor compiles the torch implementation)."""
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        ).to(device)
        lr = torch.tensor(1e-2, device=device)
        return model, Ano(model.parameters(), lr=lr, weight_decay=0.01, fused=True)

    x, y = torch.randn(64, 16, device=device), torch.randn(64, 1, device=device)
    eager_model, eager_opt = make()
    compiled_model, compiled_opt = make()
    compiled_step = torch.compile(compiled_opt.step, fullgraph=True)
    counters.clear()
    for k in range(4):
        for model, step in ((eager_model, eager_opt.step), (compiled_model, compiled_step)):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
        for opt in (eager_opt, compiled_opt):
            opt.param_groups[0]["lr"].fill_(1e-2 * 0.5**k)
    graphs = counters["stats"]["unique_graphs"]
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True)
    )
    return {"ok": graphs == 1 and diff < 1e-5, "graphs": graphs, "max_param_diff": diff}


def check_grad_scaler(device) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64, device=device)
    optimizer = Ano(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(8, 64, device=device)
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    weight = model.weight.detach().clone()
    optimizer.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    unchanged = torch.equal(weight, model.weight)
    step = optimizer.state[model.weight]["step"].item()
    return {"ok": unchanged and step == 1, "skipped_step_left_params": unchanged, "step": step}


CAPTURE_PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "fused, bf16 state": {"fused": True, "state_dtype": torch.bfloat16},
    "single, bf16 state": {"foreach": False, "state_dtype": torch.bfloat16},
}


def _graph_run(init, grads, capture: bool, options) -> list[torch.Tensor]:
    """Eight steps with an exponentially decaying device lr: all eager, or three eager warm-up
    steps on a side stream and five replays of one captured step."""
    device = init[0].device
    params = [torch.nn.Parameter(t.clone()) for t in init]
    static_grads = [torch.zeros_like(t) for t in init]
    for p, g in zip(params, static_grads, strict=True):
        p.grad = g
    optimizer = Ano(
        params, lr=torch.tensor(1e-2, device=device), weight_decay=0.05, capturable=True, **options
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)

    def load(k):
        for g, new in zip(static_grads, grads[k], strict=True):
            g.copy_(new)

    warm = 3 if capture else len(grads)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for k in range(warm):
            load(k)
            optimizer.step()
            scheduler.step()
    torch.cuda.current_stream().wait_stream(stream)
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            optimizer.step()
        for k in range(warm, len(grads)):
            load(k)
            graph.replay()
            scheduler.step()
    torch.cuda.synchronize()
    return [
        t
        for p in params
        for t in (p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])
    ] + [optimizer.state[params[0]]["step"]]


def check_cuda_graph(device) -> dict:
    gen = torch.Generator(device).manual_seed(3)
    init = [torch.randn(s, device=device, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, device=device, generator=gen) for s in SHAPES] for _ in range(8)]
    results = {}
    for label, options in CAPTURE_PATHS.items():
        try:
            eager = _graph_run(init, grads, False, options)
            replayed = _graph_run(init, grads, True, options)
        except Exception as error:
            results[label] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
            print(f"  {label}: {results[label]['error']}", flush=True)
            continue
        steps = (eager[-1].item(), replayed[-1].item())
        # Parameters: sign flips allowed on 1 %; moments (every third tensor after the first)
        # within float32 precision, or 2 % in the mean with stochastically rounded bf16 state.
        params = list(zip(eager[0:-1:3], replayed[0:-1:3], strict=True))
        moments = [
            pair for i in (1, 2) for pair in zip(eager[i:-1:3], replayed[i:-1:3], strict=True)
        ]
        total = sum(a.numel() for a, _ in params)
        # Stochastically rounded state draws different noise in the two runs: parameters then
        # differ by ~1e-4 everywhere (measured on CPU: 0.5 % of coordinates beyond 1e-3).
        limit = 1e-3 if "state_dtype" in options else 1e-5
        off = sum(int(((a - b).abs() > limit).sum()) for a, b in params)
        if "state_dtype" in options:
            err = max(
                ((a.float() - b.float()).abs().mean() / (a.float().abs().mean() + 1e-12)).item()
                for a, b in moments
            )
            ok_moments = err < 0.02
        else:
            err = _moment_excess(moments)
            ok_moments = err <= 1
        ok = steps == (8.0, 8.0) and ok_moments and off <= 0.01 * total
        results[label] = {"ok": ok, "steps": steps, "moment_err": err, "param_coords_off": off}
        print(f"  {label}: {json.dumps(results[label])}", flush=True)
    results["without capturable"] = _capture_without_capturable(device)
    print(f"  without capturable: {json.dumps(results['without capturable'])}", flush=True)
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    return results


def _capture_without_capturable(device) -> dict:
    """Capturing a step of an optimizer built without ``capturable`` must fail clearly."""
    param = torch.nn.Parameter(torch.ones(8, device=device))
    param.grad = torch.ones_like(param)
    optimizer = Ano([param], lr=1e-2)
    optimizer.step()
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            optimizer.step()
    except RuntimeError as error:
        return {"ok": "capturable is False" in str(error), "error": str(error)[:200]}
    return {"ok": False, "error": "captured without capturable=True"}


def check_group_step_time(device) -> dict:
    """Step time on ResNet-50's tensors, launches and host time included."""
    from benchmarks.shapes import resnet50_shapes

    times = {}
    for label, factory in (
        ("Ano fused=True", lambda ps: Ano(ps, fused=True)),
        ("Ano foreach=True", lambda ps: Ano(ps, foreach=True)),
        ("AdamW fused=True", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ):
        ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in resnet50_shapes()]
        for q in ps:
            q.grad = torch.randn_like(q)
        optimizer = factory(ps)
        times[label] = _cuda_ms(optimizer.step)
        print(f"  ResNet-50 set, {label}: {times[label]:.3f} ms", flush=True)
    return {"ok": True, "resnet50_ms": times}


def _cuda_ms(fn, steps=10) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _copy_kernel(p, g, m, v):
    p.add_(g)
    m.add_(g)
    v.add_(g.to(v.dtype))


def check_8bit(device) -> dict:
    """8-bit state (``state_dtype=torch.uint8``) on CUDA: ``fused=True`` there (the operator's
    torch implementation) against the C++ kernel on the CPU, 8 steps on the same gradients:
    codes equal, or within one code on at most 0.1 % of the values; scales and parameters to
    float32 precision. (The two compute the same float32 operations; only the per-tensor
    scalars come from the device's float64 pow and log there.)"""
    shapes = [(300, 64), (70, 300), (64, 64, 3, 3), (5, 1000)]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]
    runs = {}
    for label, where in (("cuda", device), ("cpu kernel", torch.device("cpu"))):
        params = [torch.nn.Parameter(t.to(where)) for t in start]
        optimizer = Ano(params, lr=1e-2, weight_decay=0.05, state_dtype=torch.uint8, fused=True)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(where)
            optimizer.step()
        runs[label] = [
            {"param": p.detach().cpu(), **{k: v.cpu() for k, v in optimizer.state[p].items()}}
            for p in params
        ]
    worst_codes, worst_param = 0.0, 0.0
    for a, b in zip(runs["cuda"], runs["cpu kernel"], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            differ = a[key] != b[key]
            gap = (a[key].int() - b[key].int()).abs()
            worst_codes = max(worst_codes, float(differ.float().mean()))
            if differ.any() and int(gap.max()) > 1:
                worst_codes = 1.0
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=0)
        worst_param = max(worst_param, float(((a["param"] - b["param"]).abs()).max()))
    return {
        "ok": worst_codes <= 1e-3 and worst_param <= 1e-5,
        "codes_off_fraction": worst_codes,
        "param_max_diff": worst_param,
    }


def check_bandwidth(device, billions: float) -> dict:
    # Rows of 1024: 2-D tensors, which 8-bit state stores as codes (1-D ones keep float32).
    rows = int(billions * 1e9 / 64 / 1024)
    per = rows * 1024
    results = {}

    def make():
        params = [torch.nn.Parameter(torch.zeros(rows, 1024, device=device)) for _ in range(64)]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        return params

    for label, factory, bytes_per in (
        ("Ano fused", lambda ps: Ano(ps, fused=True), 28),
        ("Ano fused bf16 state", lambda ps: Ano(ps, fused=True, state_dtype=torch.bfloat16), 20),
        ("Ano fused 8-bit state", lambda ps: Ano(ps, fused=True, state_dtype=torch.uint8), 16),
        ("AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True), 28),
    ):
        params = make()
        optimizer = factory(params)
        ms = _cuda_ms(optimizer.step)
        results[label] = {"ms": ms, "GB_s": bytes_per * per * 64 / ms / 1e6}
        print(f"  {label}: {ms:.2f} ms, {results[label]['GB_s']:.0f} GB/s", flush=True)
        del optimizer, params
        torch.cuda.empty_cache()
    kernel = torch.compile(_copy_kernel, fullgraph=True, dynamic=False)
    n = per * 64
    bufs = [torch.zeros(n, device=device) for _ in range(4)]
    ms = _cuda_ms(lambda: kernel(*bufs))
    results["copy kernel (4 read, 3 write)"] = {"ms": ms, "GB_s": 28 * n / ms / 1e6}
    floor = results["copy kernel (4 read, 3 write)"]["GB_s"]
    results["ano_fraction_of_copy"] = results["Ano fused"]["GB_s"] / floor
    results["ok"] = True
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--billions", type=float, default=1.0, help="parameters for bandwidth")
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: run only the checks that need no GPU, as a smoke test of this script (the "
        "test suite does, so the script cannot rot before a GPU is lent)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a machine with a GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {"torch": torch.__version__, "device": name}
    checks = [  # (name, check, needs CUDA)
        ("equivalence", check_equivalence, False),
        ("compiled_step", check_compiled_step, False),
        ("grad_scaler", check_grad_scaler, False),
        ("cuda_graph", check_cuda_graph, True),
        ("group_step_time", check_group_step_time, True),
        ("8bit", check_8bit, True),
        ("bandwidth", lambda d: check_bandwidth(d, args.billions), True),
    ]
    for check_name, check, needs_cuda in checks:
        if needs_cuda and device.type != "cuda":
            report[check_name] = {"skipped": "needs CUDA"}
            continue
        start = time.perf_counter()
        try:
            report[check_name] = check(device)
        except Exception:
            report[check_name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
        report[check_name]["seconds"] = time.perf_counter() - start
        print(f"{check_name}: {json.dumps(report[check_name])}", flush=True)
        args.output.write_text(json.dumps(report, indent=2))  # a crash keeps what ran
    args.output.write_text(json.dumps(report, indent=2))
    return 0 if all(r.get("ok", True) for r in report.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
