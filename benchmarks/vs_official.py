"""zoo's training step against the official code's, same configuration, same process, interleaved.

    python benchmarks/vs_official.py --official ~/src/DiMR --model dimr_m_3r [--batch 4] [--pairs 9]
        [--recompute | --as-released]

Nothing of the official code is bundled (their licences differ: DiT CC BY-NC, U-ViT MIT,
DiMR Apache-2.0): give the path of your own checkout; without one this says how to get it (exit 2).
The official model class is imported from that checkout and built with the zoo recipe's
configuration; the two parameter counts must be exactly equal or nothing is timed.

A step is forward + MSE against a fixed random target (summed over DiMR's branch outputs) +
backward + AdamW (the same optimiser settings on both sides). After ``--warmup`` steps of
each, ``--pairs`` pairs are timed, the order alternated within pairs (official first in even
pairs, zoo first in odd ones), so drifting load hits both sides alike. Printed: the median step
of each side, the median over pairs of official/zoo (> 1: zoo is faster) and each side's peak
memory (one more step in a fresh subprocess per side: CUDA peak allocation, or the peak CPU RSS
above the RSS before the step, sampled every millisecond: activations, gradients and optimiser
state, weights excluded).

``--recompute`` recomputes block activations in backward on both sides (zoo:
``set_grad_checkpointing``; official U-ViT: ``use_checkpoint``; official DiMR always
recomputes as released, and without ``--recompute`` its blocks are called directly here).
Neither flag: no recomputation on either side (the like-for-like comparison).

``--as-released`` times each side as its own training configuration runs it: the official
code as released (DiMR's blocks recompute through their own ``torch.utils.checkpoint`` call;
U-ViT's released configs set ``use_checkpoint=True``; DiT has none) against zoo as its recipe
trains (``train.grad_checkpointing``: on for U-ViT, off for DiT and DiMR). The step then differs
in work done as well as in code, so read the peak memory beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> (recipe, official repository, default batch)
    "dit_s_2": ("recipes/dit_s_2.yaml", "facebookresearch/DiT", 8),
    "uvit_m_4": ("recipes/uvit_m_4.yaml", "baofff/U-ViT", 4),
    "dimr_m_3r": ("recipes/dimr_m_3r.yaml", "qihao067/DiMR", 4),
    "dimr_xl_2r": ("recipes/dimr_xl_2r.yaml", "qihao067/DiMR", 2),
}
HOW_TO = """No --official checkout given. Get the official code (not bundled: its licence differs) with one of
    git clone https://github.com/facebookresearch/DiT     # dit_s_2
    git clone https://github.com/baofff/U-ViT             # uvit_m_4
    git clone https://github.com/qihao067/DiMR            # dimr_m_3r, dimr_xl_2r
then run e.g.
    python benchmarks/vs_official.py --official DiMR --model dimr_m_3r
(the official code imports timm and einops; pip install timm einops)."""


class BenchError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _dimr_stages(name: str) -> list[dict]:
    """The official DiMR stage configs equal to the zoo recipe (M/3R is not released: the paper's construction)."""
    def tf(dim, nb, side, patch, heads):
        return dict(block_type="TransformerBlock", dim=dim, hidden_dim=2 * dim, num_attention_heads=heads,
                    num_blocks=nb, max_height=side, max_width=side, image_input_ratio=1, input_feature_ratio=patch,
                    final_kernel_size=3, dropout_prob=0)

    def cnx(dim, nb, side, patch):
        return dict(block_type="ConvNeXtBlock", dim=dim, hidden_dim=2 * dim, kernel_size=7, num_blocks=nb,
                    max_height=side, max_width=side, image_input_ratio=1, input_feature_ratio=patch,
                    final_kernel_size=3, dropout_prob=0)

    if name == "dimr_m_3r":
        return [tf(768, 15, 16, 4, 12), cnx(384, 8, 32, 2), cnx(192, 8, 64, 1)]
    return [tf(960, 39, 16, 2, 16), cnx(480, 20, 32, 1)]


def build_official(name: str, path: Path, recompute: bool, as_released: bool = False) -> torch.nn.Module:
    """The official model class from the checkout at ``path``, configured as zoo's recipe.

    ``as_released``: the recomputation the released training runs use, whatever ``recompute`` says.
    """
    sys.path.insert(0, str(path))
    if name == "dit_s_2":
        if recompute and not as_released:
            raise BenchError("the official DiT has no activation recomputation; drop --recompute")
        import models  # the official DiT models.py

        return models.DiT_S_2(input_size=32, num_classes=1000, learn_sigma=True)
    if name == "uvit_m_4":
        from libs.uvit import UViT

        return UViT(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
                    qkv_bias=False, mlp_time_embed=False, num_classes=1000, use_checkpoint=recompute or as_released)
    from libs.core import blocks  # the official DiMR

    warnings.filterwarnings("ignore", message="Using slower tdp_torch")  # once per norm per step on CPU

    warnings.filterwarnings("ignore", message="torch.utils.checkpoint: the use_reentrant parameter")  # released call
    warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")  # the no_grad shape probe
    if not as_released:  # the released forward always recomputes; a runtime shim does as asked
        for cls in (blocks.TransformerBlock, blocks.ConvNeXtBlock):
            cls.forward = _recomputing_forward if recompute else _direct_forward
    in_ch = 3 if name == "dimr_m_3r" else 4
    config = types.SimpleNamespace(channels=in_ch, num_classes=1001, block_grad_to_lowres=False, norm_type="TDRMSN",
                                   stage_configs=[types.SimpleNamespace(**s) for s in _dimr_stages(name)])
    return blocks.MRModel(config)


def _direct_forward(self, x, *args, **kwargs):
    return self._forward(x, *args, **kwargs)


def _recomputing_forward(self, x, *args, **kwargs):
    # non-reentrant, as zoo's: the released call omits use_reentrant, which this torch warns about
    return torch.utils.checkpoint.checkpoint(self._forward, x, *args, use_reentrant=False, **kwargs)


def build_zoo(name: str, recompute: bool, as_released: bool = False) -> torch.nn.Module:
    """zoo's model of the recipe; ``as_released``: recomputing as the recipe's ``train.grad_checkpointing`` says."""
    import zoo

    model = zoo.build_model(ROOT / MODELS[name][0])
    model.set_grad_checkpointing(_recipe_recomputes(name) if as_released else recompute)
    return model


def build_side(side: str, args: argparse.Namespace) -> torch.nn.Module:
    """The official or zoo model as ``args`` configure it."""
    if side == "official":
        return build_official(args.model, Path(args.official), args.recompute, args.as_released)
    return build_zoo(args.model, args.recompute, args.as_released)


def recompute_label(args: argparse.Namespace) -> str:
    """How each side recomputes activations in this run, for the printed header."""
    if not args.as_released:
        return f"recompute {'on' if args.recompute else 'off'} (both sides)"
    on_off = lambda flag: "on" if flag else "off"  # noqa: E731
    return (f"as released: official recompute {on_off(args.model != 'dit_s_2')}, "
            f"zoo recompute {on_off(_recipe_recomputes(args.model))} (its recipe's train.grad_checkpointing)")


def _recipe_recomputes(name: str) -> bool:
    import zoo

    return bool(zoo.load_recipe(ROOT / MODELS[name][0])["train"].get("grad_checkpointing", False))


def make_inputs(name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, t, y)``: t as each network receives it (DiT index, U-ViT 999·t, DiMR log_snr)."""
    g = torch.Generator().manual_seed(0)
    side, ch = (32, 4) if name in ("dit_s_2", "dimr_xl_2r") else (64, 3)
    x = torch.randn(batch, ch, side, side, generator=g)
    u = torch.rand(batch, generator=g)
    t = {"dit_s_2": (u * 1000).long(), "uvit_m_4": 999 * u}.get(name, 8 * torch.ceil(u * 1000) / 1000 - 4)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def make_step(name: str, model: torch.nn.Module, official: bool, batch: int, device: torch.device):
    """A closure running one training step of ``model`` on fixed inputs and targets."""
    x, t, y = make_inputs(name, batch, device)
    call = (lambda: model(x, log_snr=t, y=y)) if official and name.startswith("dimr") else (lambda: model(x, t, y))
    model.train()
    with torch.no_grad():
        outs = call()
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(o.shape, generator=g).to(device) for o in outs]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.03,
                            fused=True)

    def step() -> None:
        out = call()
        out = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(F.mse_loss(o, tg) for o, tg in zip(out, targets))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure_memory(args: argparse.Namespace, side: str) -> float:
    """Peak MiB of one training step of one side, in this (fresh) process."""
    device = torch.device(args.device)
    model = build_side(side, args).to(device)
    step = make_step(args.model, model, side == "official", args.batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_growth(step) / 2**20


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _rss_growth(fn) -> int:
    """Peak resident bytes during ``fn()`` above those before it (sampled every millisecond).

    Not ``ru_maxrss``: building the model may already have set a higher lifetime peak.
    """
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss()) - before


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--official", str(args.official), "--model", args.model, "--batch", str(args.batch),
           "--threads", str(args.threads), "--device", args.device]
    return out + ["--recompute"] * args.recompute + ["--as-released"] * args.as_released


def run(args: argparse.Namespace) -> dict:
    """Build both, check the counts, time interleaved pairs; the figures as a dict."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    official = build_side("official", args).to(device)
    torch.manual_seed(0)
    ours = build_side("zoo", args).to(device)
    n_off, n_zoo = (sum(p.numel() for p in m.parameters()) for m in (official, ours))
    if n_off != n_zoo:
        raise BenchError(f"parameter counts differ: official {n_off:,}, zoo {n_zoo:,}; not timing (is --official a "
                         f"checkout of {MODELS[args.model][1]}?)")
    steps = {"official": make_step(args.model, official, True, args.batch, device),
             "zoo": make_step(args.model, ours, False, args.batch, device)}
    for _ in range(args.warmup):
        for side in steps:
            steps[side]()
    times: dict[str, list[float]] = {"official": [], "zoo": []}
    for i in range(args.pairs):
        for side in (("official", "zoo") if i % 2 == 0 else ("zoo", "official")):
            times[side].append(_timed(steps[side]))
    ratios = [a / b for a, b in zip(times["official"], times["zoo"])]
    return {"model": args.model, "batch": args.batch, "recompute": args.recompute, "as_released": args.as_released,
            "params": n_zoo,
            "threads": torch.get_num_threads(), "device": args.device, "pairs": args.pairs,
            "official_ms": statistics.median(times["official"]) * 1e3, "zoo_ms": statistics.median(times["zoo"]) * 1e3,
            "ratio": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
            "load_avg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import non_negative_int, positive_int
    from zoo.errors import UserError
    from zoo.guards import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="path of an official checkout (DiT, U-ViT or DiMR)")
    parser.add_argument("--model", choices=sorted(MODELS), default="dimr_m_3r")
    parser.add_argument("--batch", type=positive_int, help="batch size (default: 8 DiT-S/2, 4 U-ViT-M/4 and DiMR-M/3R, 2 XL/2R)")
    parser.add_argument("--pairs", type=positive_int, default=8,
                        help="timed official/zoo pairs after warm-up (rounded up to even: each order equally often)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps of each side first")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--recompute", action="store_true", help="activation recomputation on both sides")
    mode.add_argument("--as-released", action="store_true",
                      help="each side recomputing as it trains: the official code as released, zoo as its recipe")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    parser.add_argument("--memory-child", choices=("official", "zoo"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.official is None:  # a mistake (exit 2), with how to get the checkout
        print(f"vs_official: error: --official CHECKOUT is required\n{HOW_TO}", file=sys.stderr)
        return 2
    if not args.official.is_dir():
        print(f"vs_official: --official {args.official} is not a directory; give the path of a git clone "
              f"of {MODELS[args.model][1]} (git clone https://github.com/{MODELS[args.model][1]})", file=sys.stderr)
        return 2
    args.official = args.official.resolve()  # the memory subprocesses run from the repository root
    try:
        resolve_device(args.device)
    except UserError as err:
        parser.error(str(err))
    args.batch = args.batch or MODELS[args.model][2]
    args.pairs = max(2, args.pairs + args.pairs % 2)  # an odd count would favour the order that ran once more
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps({"peak_mib": measure_memory(args, args.memory_child)}))
        return 0
    try:
        result = run(args)
    except BenchError as e:
        print(f"vs_official: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"vs_official: {e} (is --official a checkout of {MODELS[args.model][1]} with its requirements?)",
              file=sys.stderr)
        return 2
    if not args.no_memory:
        for side in ("official", "zoo"):
            proc = subprocess.run([sys.executable, __file__, *_child_args(args), "--memory-child", side],
                                  capture_output=True, text=True, cwd=ROOT)
            lines = proc.stdout.strip().splitlines()
            result[f"{side}_peak_mib"] = json.loads(lines[-1])["peak_mib"] if proc.returncode == 0 and lines else None
            if result[f"{side}_peak_mib"] is None:  # said, not only shown as "-"
                why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"vs_official: the {side} peak-memory run failed: {why}", file=sys.stderr)
    mem = lambda v: "-" if v is None else f"{v:.0f} MiB"  # noqa: E731
    print(f"{args.model} batch {args.batch} {args.device} fp32 threads {result['threads']} "
          f"{recompute_label(args)}; params {result['params']:,} (equal)")
    print(f"  official {result['official_ms']:.0f} ms   zoo {result['zoo_ms']:.0f} ms   "
          f"official/zoo {result['ratio']:.3f} (median of {args.pairs} pairs: {result['ratios']})")
    if not args.no_memory:
        print(f"  peak memory: official {mem(result['official_peak_mib'])}, zoo {mem(result['zoo_peak_mib'])}")
    print(f"  load average {result['load_avg'][0]:.2f} {result['load_avg'][1]:.2f} {result['load_avg'][2]:.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
