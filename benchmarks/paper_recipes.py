"""Paper recipes (DiT, U-ViT, DiMR): training step and sampling time, model FLOP utilisation and
peak memory, with and without activation recomputation, beside the memory zoo.memory estimates
for the published per-GPU batch.

    python benchmarks/paper_recipes.py --quick                     # every recipes/*.yaml on this CPU
    python benchmarks/paper_recipes.py --recipes 'dimr_*' dit_s_2 --recompute off on 0,1 --json out.json
    python benchmarks/paper_recipes.py --device cuda               # published per-GPU batch, bf16 autocast

A training step is the recipe's own objective, backward and AdamW (zoo compare's ``Bench``); one
NFE is one model call at the same batch, no_grad, eval mode. Each (recipe, recompute) pair runs in
its own process, so its memory figures are its alone. Per timed step: the dense matmul rate
(``train_step.gemm_rate``: 2048³ on CPU, 8192³ on CUDA, same dtype) right before the step, then
the step, then one NFE; medians are printed. MFU = 3 × 2 × forward MACs × batch / step time /
that matmul rate (model FLOPs: the extra forward of recomputation is not counted as work); on CPU
``(cpu)`` is the same with process CPU time, which discounts time slicing by other programs.

Recompute modes: ``off`` (even where a recipe's train section turns it on), ``on`` (every block),
or one 0/1 per DiMR branch, lowest resolution first (``0,1``: only the high-resolution branch).

Memory columns (MiB unless said):
- ``peak``: on CPU the growth of the process's peak RSS (``ru_maxrss``) from just before the model
  is built to the end (weights, gradients, AdamW state, activations, temporaries and allocator
  slack, an upper bound); on CUDA ``torch.cuda.max_memory_allocated`` of a steady-state step
  plus what was allocated before it (everything the step needs).
- ``tensors``: zoo compare's ``peak_mem_mb`` (resident tensors + the peak a steady-state step
  allocates on top; on CPU from the profiler's allocation records: tensor bytes only).
- ``est``: zoo.memory's estimate of the same step (weights, gradients, AdamW moments, saved
  activations at this batch; no EMA), so ``tensors / est`` calibrates the estimate.
- ``GiB@B``: the estimate of a real training run (+ fp32 EMA) at the published per-GPU batch B,
  activations in the run's dtype (bf16 halves them), with the recompute mode of the row.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoo.cli import positive_int
from zoo.errors import UserError
from zoo.guards import resolve_device

ROOT = Path(__file__).resolve().parent.parent
if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script it is sys.path[0]; imported, appended
    sys.path.append(str(Path(__file__).resolve().parent))
from train_step import DTYPES, _timed, gemm_rate  # noqa: E402  (one timing and matmul-peak code for all benchmarks)

# Published per-GPU batch: global batch / GPUs of the released training runs.
PER_GPU_BATCH: dict[str, tuple[int, str]] = {
    "dit_": (32, "DiT: global 256 on 8 A100 (the PyTorch release; DiT issue #22)"),
    "uvit_": (128, "U-ViT: 1024 on 8 GPUs (the launch commands of its README)"),
    "dimr_m_3r": (128, "DiMR Table 4: 1024 on 8 A100"),
    "dimr_l_3r": (64, "DiMR Table 4: 1024 on 16 A100"),
    "dimr_xl_2r": (64, "DiMR Table 4: 1024 on 16 A100"),
    "dimr_xl_3r": (64, "DiMR Table 4: 1024 on 16 A100"),
    "dimr_g_2r": (64, "not in DiMR Table 4: assumed 1024 on 16 GPUs, as XL"),
}


def paper_recipes(patterns: list[str] | None = None) -> list[Path]:
    """``recipes/*.yaml`` (no ``_base`` files), filtered by name patterns (``dimr_*``, ``dit_s_2``)."""
    found = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("_"))
    if patterns:
        found = [p for p in found if any(fnmatch.fnmatch(p.stem, pat) for pat in patterns)]
    return found


def per_gpu_batch(name: str) -> tuple[int, str] | None:
    """(published per-GPU batch, where it comes from) for a paper recipe's file name, else ``None``."""
    return next((v for k, v in PER_GPU_BATCH.items() if name == k or (k.endswith("_") and name.startswith(k))), None)


def parse_mode(text: str) -> bool | list[bool]:
    """``off`` / ``on`` / ``0,1`` (one per DiMR branch) as ``set_grad_checkpointing``'s argument."""
    if text in ("off", "on"):
        return text == "on"
    flags = text.split(",")
    if not flags or any(f not in ("0", "1") for f in flags):
        raise argparse.ArgumentTypeError(f"--recompute {text!r}: use off, on or one 0/1 per branch like 0,1")
    return [f == "1" for f in flags]


def cpu_batch(gmacs: float, per_gpu: int, quick: bool) -> int:
    """A reduced batch that keeps a CPU step in seconds: ≤ 40 (quick) or 120 forward GMACs, 1 to 8."""
    return max(1, min(per_gpu, 8, int((40 if quick else 120) // gmacs)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(recipe: Path, mode: str, args: argparse.Namespace) -> dict:
    """Estimate, then time and measure one (recipe, recompute mode) in this process."""
    import zoo
    from zoo.compare import Bench, _step_peak_bytes, static_row
    from zoo.memory import EMA_BYTES_PER_PARAM, available_bytes, estimate
    from zoo.precision import set_tf32

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if cuda:
        set_tf32(True)  # zoo train's default
    else:
        torch.set_num_threads(args.threads)
    flags = parse_mode(mode)
    name = recipe.stem
    row = static_row(str(recipe))
    per_gpu, source = per_gpu_batch(name) or (int(zoo.load_recipe(str(recipe))["train"]["batch_size"]),
                                              "not a paper recipe: its train.batch_size")
    batch = args.batch or (per_gpu if cuda else cpu_batch(row.gflops, per_gpu, args.quick))
    with torch.device("meta"):
        meta = zoo.build_model(str(recipe))
    branches = len(getattr(meta, "branches", ()))
    if isinstance(flags, list) and len(flags) != branches:
        return {"recipe": name, "recompute": mode, "skipped": f"{mode} needs a DiMR with {len(flags)} branches"}
    meta.set_grad_checkpointing(flags)
    est = estimate(meta, half_precision=dtype != torch.float32, ema=False)
    result = {
        "recipe": name, "recompute": mode, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "batch": batch, "per_gpu_batch": per_gpu, "per_gpu_source": source,
        "params": row.params, "gmacs": row.gflops, "est_step_mib": est.total(batch) / 2**20,
        "est_train_gib_per_gpu": (est.total(per_gpu) + EMA_BYTES_PER_PARAM * est.params) / 2**30,
        "est_activation_mib_per_sample": est.per_sample / 2**20,
    }
    if args.estimate_only:
        return result
    free = available_bytes(device)
    if free is not None and 1.25 * est.total(batch) > free:  # temporaries come on top of the estimate
        return {**result, "skipped": f"needs about {est.total(batch) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}

    big_n = args.gemm_n or (8192 if cuda else 2048)
    gemm_rate(device, dtype, n=big_n, repeats=1)  # BLAS warm, its buffers allocated once before the baseline
    rss0 = _rss_bytes()
    bench = Bench(str(recipe), [], batch, device)
    bench.model.set_grad_checkpointing(flags)
    if dtype != torch.float32:  # autocast around forward + loss (backward and AdamW outside), and the NFE
        objective, nfe = bench.objective, bench.nfe

        def autocast_objective(*a, **kw):
            with torch.autocast(device.type, dtype=dtype):
                return objective(*a, **kw)

        def autocast_nfe() -> None:
            with torch.autocast(device.type, dtype=dtype):
                nfe()

        bench.objective, bench.nfe = autocast_objective, autocast_nfe
    for _ in range(args.warmup):  # (at least 1: AdamW state exists before the measured step)
        bench.step()
        bench.nfe()
    tensors = bench.resident_bytes() + _step_peak_bytes(bench, device)  # a steady-state step (AdamW state exists)
    work = 3 * 2 * row.gflops * 1e9 * batch
    steps, mfu, mfu_cpu, nfes, rates = [], [], [], [], []
    for _ in range(args.steps):
        rate_wall, rate_cpu = gemm_rate(device, dtype, n=big_n)
        wall, cpu = _timed(bench.step, device)
        nfes.append(_timed(bench.nfe, device)[0])
        steps.append(wall)
        rates.append(rate_wall)
        mfu.append(work / wall / rate_wall)
        mfu_cpu.append(work / cpu / rate_cpu)
    peak = tensors if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # KiB on Linux
    return {**result, "step_ms": statistics.median(steps) * 1e3, "steps_ms": [s * 1e3 for s in steps],
            "nfe_ms": statistics.median(nfes) * 1e3, "gemm_tflops": statistics.median(rates) / 1e12,
            "mfu": statistics.median(mfu), "mfu_cpu": None if cuda else statistics.median(mfu_cpu),
            "peak_mib": peak / 2**20, "peak_tensor_mib": tensors / 2**20}


def _child(recipe: Path, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(recipe), "--child-mode", mode, "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--gemm-n", str(args.gemm_n)] if args.gemm_n else [])
    cmd += (["--batch", str(args.batch)] if args.batch else []) + ["--quick"] * args.quick
    cmd += ["--estimate-only"] * args.estimate_only
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"recipe": recipe.stem, "recompute": mode, "error": last}
    return json.loads(lines[-1])


def _num(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or value != value else f"{value:>{width}{fmt}}"


def format_table(results: list[dict]) -> str:
    head = (f"{'recipe':<20} {'rc':<5} {'B':>3} {'params M':>8} {'GMACs':>7} {'step ms':>9} {'MFU':>5} {'(cpu)':>5} "
            f"{'ms/NFE':>8} {'peak':>7} {'tensors':>7} {'est':>7} {'t/est':>5} {'B gpu':>5} {'GiB@B':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lead = f"{r['recipe']:<20} {r['recompute']:<5}"
        if "error" in r:
            lines.append(f"{lead} failed: {r['error']}")
            continue
        g = r.get
        ratio = g("peak_tensor_mib") / g("est_step_mib") if g("peak_tensor_mib") else None
        line = (f"{lead} {_num(g('batch'), 'd', 3)} {_num(g('params') and g('params') / 1e6, '.1f', 8)} "
                f"{_num(g('gmacs'), '.1f', 7)} {_num(g('step_ms'), '.0f', 9)} {_num(g('mfu'), '.2f', 5)} "
                f"{_num(g('mfu_cpu'), '.2f', 5)} {_num(g('nfe_ms'), '.1f', 8)} {_num(g('peak_mib'), '.0f', 7)} "
                f"{_num(g('peak_tensor_mib'), '.0f', 7)} {_num(g('est_step_mib'), '.0f', 7)} {_num(ratio, '.2f', 5)} "
                f"{_num(g('per_gpu_batch'), 'd', 5)} {_num(g('est_train_gib_per_gpu'), '.1f', 6)}")
        lines.append(line + (f"  skipped: {r['skipped']}" if "skipped" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="recipe names or patterns (default: all)")
    parser.add_argument("--recompute", nargs="+", default=["off", "on"], metavar="MODE", help="off, on, 0,1 ...")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 autocast on CUDA")
    parser.add_argument("--batch", type=positive_int, help="batch for every recipe (default: per-GPU on CUDA, reduced on CPU)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads on CPU")
    parser.add_argument("--warmup", type=positive_int,
                        help="untimed steps before the memory-measured one (default 1; the optimizer state exists "
                        "only after one)")
    parser.add_argument("--steps", type=positive_int, help="timed steps (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="smaller CPU batches, 2 timed steps")
    parser.add_argument("--gemm-n", type=positive_int, help="side of the peak matmul (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--estimate-only", action="store_true", help="only the memory estimates (seconds a recipe)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON list")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:  # a missing GPU or an unwritable --json: one line now, not after every recipe has been measured
        resolve_device(args.device)
        if args.json:
            from zoo.guards import check_writable

            if Path(args.json).is_dir():
                raise UserError(f"--json {args.json} is a directory; give a file path")
            check_writable(Path(args.json), "--json")
    except UserError as err:
        parser.error(str(err))
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.steps = args.steps or (2 if args.quick else 5)
    for mode in args.recompute:
        try:
            parse_mode(mode)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    if args.child:
        print(json.dumps(run_one(Path(args.child), args.child_mode, args)))
        return 0
    recipes = paper_recipes(args.recipes)
    if not recipes:
        parser.error(f"no recipe in recipes/ matches {' '.join(args.recipes)}")
    load0, started, results = os.getloadavg(), time.time(), []
    for recipe in recipes:
        for mode in args.recompute:
            # a measurement runs in a process of its own (its peak memory alone); estimates need none
            results.append(run_one(recipe, mode, args) if args.estimate_only else _child(recipe, mode, args))
            r = results[-1]
            done = f"{r['step_ms']:.0f} ms a step" if "step_ms" in r else "estimated"
            print(f"{r['recipe']} {mode}: {r.get('error') or r.get('skipped') or done}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(format_table(results))
    print(f"{args.device} {args.dtype}, torch {torch.__version__}, {time.time() - started:.0f} s; load average "
          f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end (1-min; above 0.5 on this kind of machine "
          "the times are not definitive)")
    if args.json:
        from zoo.atomic import write_text

        meta = {"loadavg_start": load0, "loadavg_end": load1, "torch": torch.__version__, "argv": sys.argv[1:]}
        write_text(args.json, json.dumps([{**r, **meta} for r in results], indent=1) + "\n")
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    raise SystemExit(main())
