"""``zoo compare``: recipes side by side — size, FLOPs, training-step time, peak memory, sampling cost —
and trained runs beside them, with what they reached (step, loss, validation loss, FD).

Columns (the ``--json`` contract, in this order): ``recipe``, ``params``, ``trainable_params``,
``gflops`` (multiply-adds of one forward pass at batch 1, counted on the meta device as
``zoo build --flops`` counts them), ``train_step_ms`` (forward, the recipe's diffusion objective,
backward and an AdamW step with the recipe's parameter groups, at batch B: median over the
timed steps after warm-up), ``peak_mem_mb`` and ``sample_ms_per_nfe`` (one model call at batch
B under ``no_grad`` in eval mode; classifier-free guidance makes a guided NFE two rows per sample).

Each call runs in the arithmetic its command runs it in: a training step with the recipe's
``train.tf32`` (on CUDA, as ``zoo train`` sets it) and ``train.precision`` autocast, an NFE at the
recipe's ``sample.precision`` (as ``zoo sample`` runs it); the process's TF32 switches are restored
after each call.

Every recipe's model lives in the one process and the timed calls go round-robin
(A, B, C, A, B, C, ...), so a change of machine load hits all recipes alike and their ratios
hold on a shared machine.

A run or checkpoint directory is compared as its checkpoint's recipe, and its row adds ``run``
(:class:`zoo.run_summary.RunSummary`: the step, the loss over its last 10% of steps, the validation
loss and FD it recorded at that step).

``peak_mem_mb`` is the recipe's own training-step footprint: its resident tensors (parameters,
buffers, AdamW state; exact byte counts) plus the peak of what one training step allocates on top
(activations, gradients, temporaries). On CUDA that peak is ``torch.cuda.max_memory_allocated``
above the allocation before the step; on CPU it is the running maximum of the bytes torch's CPU
allocator hands out during one step, as ``torch.profiler``'s memory events record them (tensor
memory only: not the Python heap, not allocator caching).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import time
import unicodedata
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from zoo.errors import UserError
from zoo.precision import inference_precision
from zoo.run_summary import RunSummary

from zoo.recipe import Recipe

PLOT_CREATOR = "zoo compare"  # the Creator of zoo's SVG and PDF plots: what lets a rerun replace them
KEYS = ("recipe", "params", "trainable_params", "gflops", "train_step_ms", "peak_mem_mb", "sample_ms_per_nfe")

# DiMR paper, Table 2: parameters (millions) of the ablation rows, by recipe name (recipes/ablation/).
PAPER_TABLE2_PARAMS_M: dict[str, float] = {
    "row1_uvit_m4": 130.9,
    "row2_uvit_m4_adaln_zero": 202.4,
    "row3_multibranch_adaln_zero": 217.9,
    "row4_multibranch_tdln": 154.0,
    "row5_multibranch_tdln_glu": 132.9,
}


@dataclass
class Row:
    """One recipe's figures; the timed ones are ``None`` under ``--no-time``."""

    recipe: str
    params: int
    trainable_params: int
    gflops: float
    train_step_ms: float | None = None
    peak_mem_mb: float | None = None
    sample_ms_per_nfe: float | None = None
    run: RunSummary | None = None  # a run or checkpoint directory's training figures

    def to_json(self) -> dict:
        """The ``--json`` object: exactly :data:`KEYS`, in that order, and ``run`` for a run's row."""
        data = asdict(self)
        return {key: data[key] for key in KEYS} | ({"run": self.run.to_json()} if self.run is not None else {})


def paper_params_m(recipe: str) -> float | None:
    """The paper's parameter count (millions) for a Table 2 recipe, by its file name; else ``None``."""
    return PAPER_TABLE2_PARAMS_M.get(Path(recipe).stem)


def check_not_a_base_file(recipe: str, resolved_data: Mapping) -> None:
    """A ``_``-named file without a model (``_base_emoji32.yaml``, which other recipes include): say so, and
    to leave it out, instead of "the recipe has no model section" (a ``recipes/emoji32/*.yaml`` glob picks it up)."""
    path = Path(recipe)
    if path.name.startswith("_") and resolved_data.get("model") is None:
        raise UserError(f"{recipe} is a base file (its name starts with '_': other recipes include it through "
                        "_base_), not a recipe with a model to compare",
                        suggestion=f"leave it out, e.g. {path.parent / ('[!_]*' + path.suffix)}")


def recipe_source(recipe: str, overrides: Sequence[str] = ()) -> str | Recipe:
    """What one ``zoo compare`` argument names: a recipe file or shipped name as it is; a run directory
    (its ``last/``) or a checkpoint directory as the recipe stored in that checkpoint, whose ``model``
    section ``overrides`` may not change (the row would describe another model than the run's weights)."""
    from zoo.run_summary import checkpoint_dir, is_run_or_checkpoint

    if not is_run_or_checkpoint(recipe):
        _refuse_a_missing_path(recipe)
        return recipe
    from zoo.checkpoint import checkpoint_recipe, load_recipe_of
    from zoo.recipe import override_key

    if any(override_key(o)[0] == "model" for o in overrides):
        raise UserError(f"{recipe} is a run or checkpoint: its model section is fixed by its weights, and --set "
                        "applies to every RECIPE given", suggestion="compare the run without --set model.*, and "
                        "the changed model as a recipe in a compare of its own")
    checkpoint = checkpoint_dir(recipe)
    load_recipe_of(checkpoint)  # its mistakes name its config.json, an unknown name the plugins it was written with
    return checkpoint_recipe(checkpoint)


def _refuse_a_missing_path(recipe: str) -> None:
    """``runs/dimr`` where nothing is: say so, as a compare takes runs too ('recipe file not found ... did you
    mean dimr_m_3r.yaml' answered a mistyped run directory). A shipped recipe's relative name
    (``emoji32/dit``) and names ending in .yaml keep the recipe lookup and its suggestions."""
    from zoo.guards import RECIPE_SUFFIXES, looks_like_a_path
    from zoo.recipe import find_recipe

    path = Path(recipe).expanduser()
    if path.exists() or path.suffix.lower() in RECIPE_SUFFIXES or not looks_like_a_path(recipe):
        return
    try:
        find_recipe(recipe)
    except UserError:
        raise UserError(f"{recipe} does not exist (no run directory, checkpoint directory or recipe file "
                        "there)") from None


def static_row(recipe: str, overrides: Sequence[str] = ()) -> Row:
    """Parameters and GFLOPs on the meta device (no weights allocated)."""
    from zoo.flops import count_flops
    from zoo.meta import build_on_meta
    from zoo.recipe import resolve
    from zoo.training.fit import check_recipe_fits_model
    from zoo.validate import model_factory, validate_recipe

    source = recipe_source(recipe, overrides)
    resolved = resolve(source, list(overrides))
    check_not_a_base_file(recipe, resolved.data)
    validate_recipe(resolved)  # as zoo build does: every section, and the components imported outside the meta build
    model = build_on_meta(model_factory(resolved))
    if not isinstance(source, Recipe):  # a run is compared as it was trained
        try:
            check_recipe_fits_model(resolved.data, model)  # what zoo build refuses against the model
        except UserError as err:
            raise resolved.locate(err) from None
    report = count_flops(model, max_depth=1)
    return Row(recipe, int(report.params), int(report.trainable_params), float(report.gflops))


def time_interleaved(tasks: Mapping[str, Callable[[], None]], warmup: int = 2, repeats: int = 5,
                     sync: Callable[[], None] = lambda: None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each task's calls, run round-robin: ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return times


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Bench:
    """One recipe's model, optimizer, objective and batch on a device: a training step and one NFE."""

    def __init__(self, recipe: str, overrides: Sequence[str], batch: int, device: torch.device, seed: int = 0):
        import zoo
        from zoo.diffusion.setup import build_objective
        from zoo.meta import example_inputs
        from zoo.sample import num_classes
        from zoo.training.optim import build_optimizer

        from zoo.precision import autocast_dtype
        from zoo.sample import sampling_precision
        from zoo.training.loop import set_grad_checkpointing
        from zoo.training.sections import TRAIN_DEFAULTS

        self.recipe = zoo.load_recipe(recipe_source(recipe, overrides), list(overrides))
        train = {**TRAIN_DEFAULTS, **(self.recipe.get("train") or {})}  # what zoo train reads
        torch.manual_seed(seed)
        self.model = zoo.build_model(self.recipe).to(device).train()
        if train.get("grad_checkpointing"):  # the step the recipe trains: with its recomputation and precision
            set_grad_checkpointing(self.model, True)
        self.autocast = autocast_dtype(train.get("precision", "fp32"))
        self.optimizer = build_optimizer(self.model, train)
        self.objective = build_objective(self.recipe)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        x, t, y = example_inputs(self.model, batch)
        classes = num_classes(self.recipe)
        self.x, self.t = x, t
        self.y = None if classes is None else torch.randint(0, classes, (batch,), device=device)
        self.y_model = y if self.y is None else self.y  # what the bare model call gets
        # the TF32 switch zoo train sets from train.tf32 on CUDA (its autocast is self.autocast), and the
        # precision zoo sample calls the model at: fp32 arithmetic would time neither
        self.train_precision = "tf32" if train["tf32"] else "fp32"
        self.sample_precision = sampling_precision(self.recipe, None, x.dtype)

    def step(self) -> None:
        """Forward, the objective (under the recipe's autocast precision), backward, AdamW step."""
        device = self.x.device
        with inference_precision(self.train_precision, device):  # the TF32 switch for forward and backward alike
            with torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                loss = self.objective(self.model, self.x, self.y, self.generator)["loss"].mean()
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def nfe(self) -> None:
        """One model call at batch B under ``no_grad`` at the recipe's sampling precision (the model is put
        in eval mode once by :meth:`evaluating`, outside the timed calls)."""
        with torch.no_grad(), inference_precision(self.sample_precision, self.x.device):
            self.model(self.x, self.t, self.y_model)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode inside, back in training mode after."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def resident_bytes(self) -> int:
        """Parameters, buffers and optimizer state (after a step, when AdamW's state exists)."""
        state = [v for s in self.optimizer.state.values() for v in s.values()]
        return _tensor_bytes([*self.model.parameters(), *self.model.buffers(), *state])


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (the profiler's C++ side logs its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_peak_bytes(fn: Callable[[], None]) -> int:
    """Running maximum of the CPU tensor bytes allocated during ``fn()``, from the profiler's memory records."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's allocations are recorded on the op (its own, without its children's: self_cpu_memory_usage,
    # net of what it freed before returning); frees outside any op are "[memory]" events.
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def _step_peak_bytes(bench: Bench, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        bench.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_step_peak_bytes(bench.step)


def measure(recipes: Sequence[str], overrides: Sequence[str] = (), batch: int = 4, device: str | None = None,
            warmup: int = 2, repeats: int = 5, time_it: bool = True,
            log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """One :class:`Row` per recipe (a run's with its :class:`RunSummary`); with ``time_it``, the timed
    columns from interleaved runs."""
    from zoo.run_summary import is_run_or_checkpoint, summarize

    rows = [static_row(r, overrides) for r in recipes]
    for row in rows:
        if is_run_or_checkpoint(row.recipe):
            row.run = summarize(row.recipe)
    if not time_it:
        return rows
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    benches = [Bench(r, overrides, batch, dev) for r in recipes]  # all alive at once: the timing is interleaved
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    log(f"zoo compare: timing {len(recipes)} recipe(s) at batch {batch} on {dev}, interleaved")
    steps = time_interleaved({str(i): b.step for i, b in enumerate(benches)}, warmup, repeats, sync)
    with contextlib.ExitStack() as stack:  # eval mode once, outside the timed calls: not a walk over every module
        for bench in benches:
            stack.enter_context(bench.evaluating())
        nfes = time_interleaved({str(i): b.nfe for i, b in enumerate(benches)}, warmup, repeats, sync)
    for i, (row, bench) in enumerate(zip(rows, benches)):
        row.train_step_ms = statistics.median(steps[str(i)]) * 1e3
        row.sample_ms_per_nfe = statistics.median(nfes[str(i)]) * 1e3
        row.peak_mem_mb = (bench.resident_bytes() + _step_peak_bytes(bench, dev)) / 2**20
    return rows


def display_width(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and full-width characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (``str.ljust`` counts characters, not columns)."""
    return text + " " * (width - display_width(text))


def format_table(rows: Sequence[Row]) -> str:
    """A printable table; a ``paper`` column appears when a recipe has the paper's Table 2 count, and
    ``step``, ``loss``, ``val loss``, ``FD`` columns when a row is a run."""
    paper = [paper_params_m(r.recipe) for r in rows]
    width = max(len("recipe"), *(display_width(r.recipe) for r in rows))
    head = f"{_pad('recipe', width)}  {'params':>15}  {'trainable':>15}  {'GFLOPs':>8}"
    if any(p is not None for p in paper):
        head += f"  {'paper (T2)':>10}"
    head += f"  {'step ms':>9}  {'peak MB':>9}  {'ms/NFE':>8}"
    runs = any(r.run is not None for r in rows)
    if runs:
        head += f"  {'step':>8}  {'loss':>8}  {'val loss':>8}  {'FD':>8}  {'FD n':>6}"
    lines = [head, "-" * len(head)]

    def num(value: float | None, fmt: str, w: int) -> str:
        return f"{'-':>{w}}" if value is None else f"{value:>{w}{fmt}}"

    for row, p in zip(rows, paper):
        gflops = f"{row.gflops:>8.2f}" if row.gflops >= 1 else f"{row.gflops:>8.4f}"
        line = f"{_pad(row.recipe, width)}  {row.params:>15,}  {row.trainable_params:>15,}  {gflops}"
        if any(q is not None for q in paper):
            line += f"  {'-':>10}" if p is None else f"  {f'{p:.1f}M':>10}"
        line += (f"  {num(row.train_step_ms, '.1f', 9)}  {num(row.peak_mem_mb, '.1f', 9)}"
                 f"  {num(row.sample_ms_per_nfe, '.2f', 8)}")
        if runs:
            run = row.run or RunSummary(checkpoint="")
            line += (f"  {num(run.step, 'd', 8)}  {num(run.loss, '.4f', 8)}  {num(run.val_loss, '.4f', 8)}"
                     f"  {num(run.fd, '.2f', 8)}  {num(run.fd_n, 'd', 6)}")
        lines.append(line)
    return "\n".join(lines)


def plot_labels(recipes: Sequence[str]) -> list[str]:
    """Short point labels that tell the recipes apart: the file stem, with as many parent folders as it
    takes (``emoji32/dit`` and ``imagenet/dit``, where the stems alone would both read ``dit``)."""
    parts = [Path(r).with_suffix("").parts if Path(r).suffix else Path(r).parts for r in recipes]

    def label(i: int) -> str:
        for n in range(1, len(parts[i]) + 1):
            tail = parts[i][-n:]
            if all(other[-n:] != tail for j, other in enumerate(parts) if j != i and other != parts[i]):
                return "/".join(tail)
        return "/".join(parts[i])

    return [label(i) for i in range(len(recipes))]


def a_zoo_plot(path: Path) -> bool:
    """Whether ``path`` is a plot zoo compare wrote, by its creator metadata field: PNG's Software text chunk,
    SVG's ``<dc:creator>`` title, PDF's ``/Creator`` in the trailer's info dictionary (not the text anywhere)."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        from zoo.guards import a_zoo_png

        return a_zoo_png(path)
    try:
        if suffix == ".svg":
            return _svg_creator(path) == PLOT_CREATOR
        if suffix == ".pdf":
            return _pdf_creator(path.read_bytes()) == PLOT_CREATOR.encode()
    except (OSError, ElementTree.ParseError):
        return False
    return False


_DC, _CC, _SVG = "{http://purl.org/dc/elements/1.1/}", "{http://creativecommons.org/ns#}", "{http://www.w3.org/2000/svg}"


def _svg_creator(path: Path) -> str | None:
    """The creator matplotlib writes into an SVG's metadata (``metadata/RDF/Work/creator/Agent/title``)."""
    for _, element in ElementTree.iterparse(path):
        if element.tag == f"{_DC}creator":
            title = element.find(f"{_CC}Agent/{_DC}title")
            return None if title is None else title.text
        if element.tag == f"{_SVG}metadata":  # the metadata ended without a creator
            return None
    return None


def _pdf_creator(data: bytes) -> bytes | None:
    """The ``/Creator`` string of a PDF's info dictionary (the one the last trailer's ``/Info`` names)."""
    trailers = re.findall(rb"trailer\s*<<(.*?)>>", data, flags=re.S)
    info = re.search(rb"/Info\s+(\d+)\s+(\d+)\s+R", trailers[-1]) if trailers else None
    if info is None:
        return None
    number, generation = info.groups()
    obj = re.search(rb"(?:^|[\r\n])" + number + rb"\s+" + generation + rb"\s+obj\s*<<(.*?)>>\s*endobj", data, flags=re.S)
    creator = re.search(rb"/Creator\s*\(((?:[^()\\]|\\.)*)\)", obj.group(1)) if obj else None
    return None if creator is None else creator.group(1)


def plot(rows: Sequence[Row], path: str | Path) -> Path:
    """GFLOPs against parameters (and against step time when timed), one labelled point per recipe; atomic write."""
    from zoo.plotting import agg_matplotlib

    agg_matplotlib()
    import matplotlib.pyplot as plt

    from zoo.atomic import write_file

    path = Path(path)
    timed = all(r.train_step_ms is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4.5), squeeze=False)
    panels = [("params (M)", lambda r: r.params / 1e6)] + ([("train step (ms)", lambda r: r.train_step_ms)] if timed else [])
    for ax, (label, x) in zip(axes[0], panels):
        for r, name in zip(rows, plot_labels([r.recipe for r in rows])):
            ax.scatter(x(r), r.gflops)
            ax.annotate(name, (x(r), r.gflops), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("GFLOPs (multiply-adds, batch 1)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        from zoo.sample import GRID_SOFTWARE

        # what tells zoo's plot from a user's file, so that a rerun replaces it and nothing else
        tag = {"metadata": {"Software": GRID_SOFTWARE} if fmt == "png" else {"Creator": PLOT_CREATOR}}
        write_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, **tag))
    finally:
        plt.close(fig)
    return path
