"""Training-step speed and utilisation of the paper configs against the official code's measured anchors.

A training step is forward + backward + AdamW step. Step time is the median of ``--steps``
steps after ``--warmup`` warm-ups. Utilisation = 3 × forward FLOPs (2 per MAC) × batch / step
time, divided by the rate of a 2048×2048×2048 matmul (same dtype, same device) measured in
the same process right before each timed step, so machine load hits both alike; on CPU the
same ratio by process CPU time is reported too (robust to other programs on the cores).

Each config runs in its own subprocess, so peak memory is that config's alone: on CPU the
``ru_maxrss`` growth over the steps (activations, gradients, optimiser state; weights
excluded), on CUDA ``torch.cuda.max_memory_allocated`` (everything).

    python benchmarks/train_step.py                       # CPU, fp32, 2 threads, the speed-anchor configs
    python benchmarks/train_step.py --device cuda --dtype bf16 --batch 64
    python benchmarks/train_step.py --only dimr_m_3r --profile   # + torch.profiler top ops
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import torch.nn.functional as F

from zoo.cli import non_negative_int, positive_int
from zoo.errors import UserError
from zoo.guards import resolve_device

ROOT = Path(__file__).resolve().parent.parent
# name -> (recipe, anchor batch, official step ms, official utilisation)
CONFIGS = {
    "dit_s_2": ("recipes/dit_s_2.yaml", 8, 1956.0, 0.86),
    "uvit_m_4": ("recipes/uvit_m_4.yaml", 4, 5004.0, 0.97),
    "dimr_m_3r": ("recipes/dimr_m_3r.yaml", 4, 11888.0, 0.62),
}
TARGETS = {"dit_s_2": 0.86, "uvit_m_4": 0.95, "dimr_m_3r": 0.87}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fused: one kernel over all parameters (CPU and CUDA); for-loop: PyTorch's CPU default, 6-8
# passes over memory and temporaries per parameter (what the official anchor runs used).
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """FLOP/s of an ``n³`` matmul (2 FLOPs per MAC), median of ``repeats``: (by wall time, by CPU time)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1

    def products() -> None:
        for _ in range(inner):
            a @ b

    products()
    walls, cpus = zip(*(_timed(products, device) for _ in range(repeats)))
    flop = 2 * n**3 * inner
    return flop / statistics.median(walls), flop / max(statistics.median(cpus), 1e-9)


def _loss(out, targets: dict) -> torch.Tensor:
    """MSE of every output against a fixed random target (DiMR returns one prediction per branch).

    A real target, not ``out²``: a fresh DiT outputs exactly 0, so ``out²`` would give zero
    gradients everywhere.
    """
    outs = out if isinstance(out, (list, tuple)) else [out]
    for i, o in enumerate(outs):
        if i not in targets:
            targets[i] = torch.randn(o.shape, device=o.device, generator=torch.Generator(o.device).manual_seed(i))
    return sum(F.mse_loss(o.float(), targets[i]) for i, o in enumerate(outs))


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of one config in this process; returns the figures."""
    import zoo
    from zoo.flops import count_recipe_flops

    recipe, default_batch, _, _ = CONFIGS[name]
    batch = _batches(args.batch).get(name, default_batch)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gmacs = count_recipe_flops(ROOT / recipe).gflops
    torch.manual_seed(0)
    model = zoo.build_model(ROOT / recipe).to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x, t, y = model.example_inputs(batch)
    x = x.contiguous(memory_format=memory_format)
    step_model = torch.compile(model) if args.compile else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.03, **ADAMW[args.adamw])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    targets: dict = {}

    def step() -> None:
        with autocast:
            loss = _loss(step_model(x, t, y), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        step()
    # Each timed step follows its own GEMM measurement, so a load change on a shared machine
    # hits the step and its yardstick alike; CPU-time figures also discount time slicing.
    work = 3 * 2 * gmacs * 1e9 * batch  # forward + backward ≈ 3 forwards, 2 FLOPs per MAC
    walls, utils, utils_cpu, rates = [], [], [], []
    for _ in range(args.steps):
        rate_wall, rate_cpu = gemm_rate(device, dtype)
        wall, cpu = _timed(step, device)
        walls.append(wall)
        rates.append(rate_wall)
        utils.append(work / wall / rate_wall)
        utils_cpu.append(work / cpu / rate_cpu if device.type == "cpu" else float("nan"))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    result = {
        "config": name, "batch": batch, "device": args.device, "dtype": args.dtype,
        "gmacs_per_sample": gmacs, "step_ms": statistics.median(walls) * 1e3, "steps_ms": [w * 1e3 for w in walls],
        "gemm_gflops": statistics.median(rates) / 1e9, "utilisation": statistics.median(utils),
        "utilisation_cpu_time": statistics.median(utils_cpu), "peak_mib": peak_mib,
        "compile": args.compile, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
        "adamw": args.adamw,
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    return result


def _batches(specs: list[str]) -> dict[str, int]:
    """``["64"]`` -> every config 64; ``["dit_s_2=64", "uvit_m_4=32"]`` -> per config (ValueError: a bad one)."""
    out: dict[str, int] = {}
    for spec in specs:
        name, _, n = spec.rpartition("=")
        if name and name not in CONFIGS:
            raise ValueError(f"--batch {spec}: no config {name!r} (configs: {', '.join(CONFIGS)})")
        try:
            if int(n) < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"--batch {spec}: the batch must be a positive integer") from None
        for config in [name] if name else CONFIGS:
            out[config] = int(n)
    return out


def _child_command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--adamw", args.adamw]
    if args.batch:
        cmd += ["--batch", *args.batch]
    cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last + ["--profile"] * args.profile
    return cmd


def _fmt(value: float) -> str:
    return f"{'-':>6}" if value != value else f"{value:>6.3f}"  # NaN (no CPU-time figure on CUDA)


def format_table(results: list[dict]) -> str:
    """The anchor table: ours beside the official figures (shown only for the anchor setting itself)."""
    head = (f"{'config':<10} {'dev':<4} {'dtype':<5} {'batch':>5} {'step ms':>9} {'util':>6} {'(cpu)':>6} {'target':>6} "
            f"{'official ms':>11} {'off. util':>9} {'GEMM GFLOP/s':>12} {'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:<10} failed: {r['error']}")
            continue
        _, batch, off_ms, off_util = CONFIGS[r["config"]]
        same = (r["device"] == "cpu" and r["dtype"] == "fp32" and r["batch"] == batch
                and r.get("threads") == 2)  # the anchors' setting
        target = f"{TARGETS[r['config']]:.2f}" if same else "-"
        official = (f"{off_ms:>11.0f} {off_util:>9.2f}") if same else f"{'-':>11} {'-':>9}"
        lines.append(
            f"{r['config']:<10} {r['device']:<4} {r['dtype']:<5} {r['batch']:>5} {r['step_ms']:>9.1f} "
            f"{r['utilisation']:>6.3f} {_fmt(r['utilisation_cpu_time'])} {target:>6} {official} "
            f"{r['gemm_gflops']:>12.1f} {r['peak_mib']:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configs to run (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 = autocast, fp32 master weights")
    parser.add_argument("--batch", nargs="+", default=[], metavar="N|CONFIG=N",
                        help="batch size for all configs, or per config (default: the anchors')")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads on CPU (anchors: 2)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--adamw", choices=sorted(ADAMW), default="fused", help="AdamW implementation (default fused)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and input")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    # A bad option stops here, as argparse's one-line error (exit 2), not as a failed row per config.
    try:
        _batches(args.batch)
        resolve_device(args.device)
    except (ValueError, UserError) as err:
        parser.error(" ".join(str(err).split()))
    if args.child:
        print(json.dumps(run_config(args.child, args)))
        return 0
    results = []
    for name in args.only or list(CONFIGS):
        proc = subprocess.run(_child_command(name, args), cwd=ROOT, capture_output=True, text=True)
        if args.profile or proc.returncode:
            sys.stderr.write(proc.stderr)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"config": name, "error": last})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    if args.device == "cpu":
        print("util: each step against the 2048³ GEMM rate measured just before it (median over steps); "
              "(cpu): the same with process CPU time instead of wall time, which discounts time slicing "
              "when other programs share the cores (not cache or memory-bandwidth contention).")
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    raise SystemExit(main())
