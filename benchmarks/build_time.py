"""Wall time of ``zoo build RECIPE --flops`` for every paper recipe (target: < 5 s each).

Each build runs as a fresh subprocess, exactly as a user types it (interpreter start, imports,
recipe validation, meta-device build, FLOP count), ``--repeats`` times; the table shows the
median, the GFLOPs and params the command printed (``--json``), and whether it met the limit.

    python benchmarks/build_time.py                 # the paper recipes
    python benchmarks/build_time.py recipes/dit_*.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every shipped paper recipe (the same set as paper_recipes.py): it left out 9 of them (dit_*_4/8, uvit_l_2, ...)
PAPER_RECIPES = tuple(sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("_")))
LIMIT_S = 5.0


def zoo_command() -> list[str]:
    """The installed ``zoo`` console script (the user's command), beside this interpreter if there."""
    beside = Path(sys.executable).parent / "zoo"
    found = str(beside) if beside.is_file() else shutil.which("zoo")
    if not found:
        raise SystemExit("the zoo command is not installed: pip install -e .")
    return [found]


def time_build(recipe: Path, repeats: int) -> dict:
    """Median wall time of ``zoo build RECIPE --flops --json`` and what it printed."""
    times, out, err = [], None, ""
    for _ in range(repeats):
        start = time.perf_counter()
        # Absolute: the command runs in ROOT, where a path relative to the caller's directory names nothing.
        proc = subprocess.run(zoo_command() + ["build", str(recipe.resolve()), "--flops", "--json"],
                              cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            break
        out = json.loads(proc.stdout)
    return {"recipe": recipe.stem, "seconds": statistics.median(times), "result": out, "error": err}


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default: the paper recipes)")
    parser.add_argument("--repeats", type=positive_int, default=1)
    args = parser.parse_args(argv)
    recipes = args.recipes or [ROOT / "recipes" / f"{name}.yaml" for name in PAPER_RECIPES]
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        parser.error(f"no recipe file {', '.join(missing)}")

    print(f"{'recipe':<14} {'seconds':>8} {'params':>15} {'GFLOPs':>9}  status", flush=True)
    failed = 0
    for recipe in recipes:
        r = time_build(recipe, args.repeats)
        if r["error"]:
            status, params, gflops = f"FAILED: {r['error']}", "-", "-"
        else:
            status = "ok" if r["seconds"] < LIMIT_S else f"SLOW (> {LIMIT_S:.0f} s)"
            params, gflops = f"{r['result']['params']:,}", f"{r['result']['gflops']:.2f}"
        failed += status != "ok"
        print(f"{r['recipe']:<14} {r['seconds']:>8.2f} {params:>15} {gflops:>9}  {status}", flush=True)
    return int(failed > 0)


if __name__ == "__main__":
    raise SystemExit(main())
