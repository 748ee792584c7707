"""The training loop a recipe's ``train`` section drives (``zoo train``).

Per step: the global batch of ``train.batch_size`` samples, split over the processes (DDP or
FSDP2 under ``torchrun``) and within each into ``train.grad_accum`` micro-batches; each
sample's time, noise, label drop and flip drawn from its global index (:mod:`.draws`), so
neither split changes the losses; the recipe's objective under fp32, bf16 or fp16 autocast
(fp16 with a gradient scaler); backward (optionally through recomputed block activations and
a ``torch.compile``-d model); the gradient norm (clipped at ``grad_clip``); a non-finite loss
or gradient stops the run before the weights change; AdamW at the warm-up learning rate; fp32 EMA.

Every ``log_every`` steps a record (:mod:`.monitor`); every ``ckpt_every`` steps
``OUT/step_XXXXXXX/`` (the oldest beyond ``keep_last`` pruned) and ``OUT/last/``, each written
atomically; every ``sample_every`` steps and at the last step an EMA sample grid; every
``eval_every`` steps a small FD of the EMA weights (:mod:`.eval_hook`). Ctrl-C or SIGTERM saves
``last/`` after the step (:mod:`.signals`).
"""

from __future__ import annotations

import contextlib
import copy
import shlex
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

import zoo
from zoo.atomic import is_sealed, sealed_at
from zoo.checkpoint import CONFIG, STEP_NAME, check_replaceable, newest_step, repair_run, save_checkpoint
from zoo.diffusion.setup import GuidanceSettings
from zoo.errors import UserError, one_of
from zoo.memory import require_training_memory
from zoo.meta import example_inputs
from zoo.options import TRAIN_OPTIONS
from zoo.precision import autocast_dtype, set_tf32
from zoo.sample import check_sample_section, num_classes, vae_weights
from zoo.training import distributed
from zoo.training.compile_check import check_compile_toolchain
from zoo.training.data import (EpochSampler, batches, build_dataset, class_names, data_line, gives_latents,
                               unread_data_keys)
from zoo.training.draws import draw
from zoo.training.eval_hook import evaluation, fd_hook
from zoo.training.fit import training_objective
from zoo.training.ema import EMA
from zoo.training.optim import build_optimizer, learning_rate
from zoo.training.rundir import prune_steps
from zoo.training.resume import Resuming
from zoo.training.runlock import RunLock, check_unlocked
from zoo.training.sections import TRAIN_DEFAULTS as DEFAULTS, data_setting
from zoo.training.signals import CutShort, StopRequested, StopSignals, ignored_stop_note
from zoo.training.val_loss import val_hook


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf; the weights were not updated with it."""

    def __init__(self, step: int, what: str, last: int | None, where: Path | None = None,
                 train: dict | None = None, stopped: str = "stopped without updating the weights",
                 remedy: str | None = None, updated: bool = True) -> None:
        kept = (f"{where or 'last/'} holds step {last}, the last finite checkpoint" if last is not None
                else "no checkpoint was written")
        super().__init__(f"{what} is not finite at step {step}; {stopped} ({kept}). "
                         f"{remedy or _remedies(train or {}, updated)}")
        self.step = step


class _UnreadOnARank(Exception):
    """A rank could not read its slice of this step's batch: every rank drops the step and stops."""


# The skipped steps changed no weight, and grad_clip acts on gradients the scaler has already found infinite:
# neither a lower lr nor clipping brings them back into fp16's range.
FP16_OVERFLOW = ("Use precision bf16 (or fp32) instead of fp16: this model's fp16 forward or backward overflows "
                 "even unscaled (train.lr and train.grad_clip act only on steps that were taken)")


def _remedies(train: dict, updated: bool = True) -> str:
    """What to try after a non-finite step, given what the run already does. ``updated``: whether the
    optimizer has taken a step; before its first, the weights are the ones the run started from, and
    neither train.lr nor train.grad_clip (they act on updates) can be the cause."""
    fp16 = ["use precision bf16 (or fp32) instead of fp16"] if train.get("precision") == "fp16" else []
    if updated:
        text = one_of(["lower train.lr", *([] if train.get("grad_clip") else ["set train.grad_clip"]), *fp16])
    else:
        start = "train.init_from's weights" if train.get("init_from") else "the model and diffusion sections"
        text = (one_of([*fp16, f"check {start}"]) +
                " (no update was made yet: train.lr and train.grad_clip act only on updates)")
    return text[0].upper() + text[1:]


def _has_updated(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has taken a step, in this process or before a resume: AdamW's per-weight step
    counts (a fused AdamW creates them at 0 on a step fp16's scaler skips). Reads the device: for error paths."""
    return any(float(state.get("step", 0)) > 0 for state in optimizer.state.values())


def set_grad_checkpointing(model: torch.nn.Module, enable: bool = True) -> None:
    """Recompute every block's activations in backward, for any backbone (its ``set_grad_checkpointing``)."""
    switch = getattr(model, "set_grad_checkpointing", None)
    if switch is None:
        raise UserError(f"backbone {type(model).__name__} has no set_grad_checkpointing(); "
                        "train.grad_checkpointing needs one", key_path="train.grad_checkpointing")
    switch(enable)


def unconditional_note(recipe: Mapping[str, Any]) -> str | None:
    """What a recipe made unconditional by ``model.num_classes: 0`` (a class-conditional recipe with
    ``--set model.num_classes=0``) still sets for labels and no longer uses, said once at the start."""
    declared = (recipe.get("model") or {}).get("num_classes")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared > 0:
        return None
    diffusion, data = recipe.get("diffusion") or {}, recipe.get("data") or {}
    unused = [f"data.num_classes {data['num_classes']} (the data's labels)"] if data.get("num_classes") else []
    unused += [f"diffusion.label_drop {diffusion['label_drop']}"] if diffusion.get("label_drop") else []
    unused += [f"diffusion.null_label {diffusion['null_label']}"] if diffusion.get("null_label") is not None else []
    cfg = (recipe.get("sample") or {}).get("cfg") or {}
    if GuidanceSettings(scale=cfg.get("scale"), convention=cfg.get("convention", "dit")).active:
        unused.append(f"sample.cfg.scale {cfg['scale']:g} (guidance)")
    if not unused:
        return None
    return (f"model.num_classes {declared} makes the model unconditional: {', '.join(unused)} "
            f"{'is' if len(unused) == 1 else 'are'} not used")


def _cpu_has_fast_fp16() -> bool:
    """Whether this CPU multiplies float16 in hardware (AMX-FP16); without it autocast emulates fp16 slowly."""
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return bool(probe()) if probe is not None else True  # an unknown torch: no claim either way


def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); an unknown torch: no claim."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def _labels_dropped_by_trainer(model: torch.nn.Module) -> None:
    """Label embedders that drop labels themselves (DiT's) stay in eval mode: the trainer drops
    labels per sample instead, at the same rate, so the drops do not depend on the process count."""
    from zoo.conditioning.embeddings import LabelEmbedder

    for m in model.modules():
        if isinstance(m, LabelEmbedder):
            m.eval()


def _check_utf8_path(out: Path) -> None:
    """Refuse a run directory whose name is not UTF-8 (``runs/r\\xfcn`` in a Latin-1 shell): TensorBoard's
    writer fails on it at the first log record, after steps were trained and before any was saved."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(out).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(f"the run directory {shown} is not a valid UTF-8 path (TensorBoard cannot write there)",
                        suggestion="choose a UTF-8 path for --out") from None


class Trainer(Resuming):
    """One run: model, EMA, optimizer, data stream and the run directory ``out`` (its weights from a
    checkpoint on ``--resume`` or ``train.init_from``: :class:`~zoo.training.resume.Resuming`)."""

    def __init__(self, recipe: dict, out: str | Path, device: str | None = None, resume: str | Path | None = None,
                 log: Callable[[str], None] = print, allow_recipe_change: bool = False) -> None:
        self.ctx = distributed.init(device)
        recipe = {**recipe}  # the run may record what its data holds (data.num_classes); the caller's stays as given
        self.recipe, self.out = recipe, Path(out)
        self.print = log if self.ctx.main else (lambda *_: None)
        self.after_banner: list[str] = []  # lines of the setup that follow the run's first lines
        self.monitor = None  # rank 0's, while run() runs
        with distributed.agreement(self.ctx):  # a mistake on any rank stops all of them, with one message
            _check_utf8_path(self.out)
            dataset = self._set_up(recipe, resume, allow_recipe_change)
        data = recipe.get("data") or {}
        self.wrapped = distributed.wrap(self.model, self.ctx, self.train["parallel"], self.train["precision"])
        self.ema = EMA(self.model, self.train["ema_decay"])  # after sharding: FSDP keeps it sharded too
        self.optimizer = build_optimizer(self.model, self.train)
        if resume is not None:
            self._load_state(self._resumed_from)
        # Static shapes: a training batch has one shape, and with dynamic ones torch 2.14's inductor
        # fails on DiMR's first step ("cannot determine truth value of Relational").
        self.forward = torch.compile(self.wrapped, dynamic=False) if self.train["compile"] else self.wrapped
        # Prepared latents hold the encoding of each image's mirror image and draw it themselves: a
        # flip of the latent on top would be a second flip, and not a VAE encoding of anything.
        self.flip = bool(data_setting(data, "random_flip")) and not getattr(dataset, "draws_flips", False)
        if self.flip and gives_latents(data):
            self.after_banner.append("zoo train: note: data.random_flip mirrors the latents themselves (these shards "
                                     "hold no encoding of the mirrored images): close to, not equal to, the flipped "
                                     "image's latent; zoo prepare-latents stores both, or set data.random_flip: false")
        self.batches = batches(dataset, self.batch, self.seed, self.step, int(data_setting(data, "num_workers")),
                               pin_memory=self.device.type == "cuda", rank=self.ctx.rank, world=self.ctx.world)
        self.conditional = num_classes(recipe) is not None
        self.fresh = resume is None  # a new run: its directory must still hold none when run() locks it
        self.last_saved: int | None = self.step if resume is not None else None
        self.last_dir: Path | None = self._resumed_from if resume is not None else None  # where last_saved is
        self.stops = StopSignals()  # Ctrl-C / SIGTERM requests; handlers installed while run() runs
        self.cut = False  # whether a stop cut this step's grid or evaluation short (rank 0's word)

    def _record_trained_classes(self, recipe: dict, dataset: Dataset) -> dict:
        """Data of fewer classes (N) than the model embeds (an image folder of 5 classes under a 10-class
        recipe) trains labels 0..N-1 only: the run records ``data.num_classes: N``, so its grids and FD, and
        zoo sample and zoo eval of its checkpoints, draw those labels, not ones no image ever carried.
        Returns the data section."""
        have, declared = getattr(dataset, "num_classes", None), num_classes(recipe)
        if isinstance(have, int) and declared is not None and 0 < have < declared:
            recipe["data"] = {**(recipe.get("data") or {}), "num_classes": have}
            self.after_banner.append(f"zoo train: note: the data has {have} classes and the model {declared}: labels "
                                     f"{have}..{declared - 1} are never trained, so this run records data.num_classes "
                                     f"{have} (its grids, zoo sample and zoo eval draw labels 0..{have - 1})")
        return recipe.get("data") or {}

    def _set_up(self, recipe: dict, resume: str | Path | None, allow_recipe_change: bool) -> Dataset:
        """Settings, data, hooks, model, objective and resumed weights: everything before the first
        collective, and every check that can refuse the run; returns the dataset."""
        self.train = {**DEFAULTS, **(recipe.get("train") or {})}
        self.fsdp = self.ctx.distributed and self.train["parallel"] == "fsdp"
        self.device = self.ctx.device
        self.batch, self.accum = int(self.train["batch_size"]), int(self.train["grad_accum"])
        if self.batch % (self.ctx.world * self.accum):
            raise UserError(f"train.batch_size {self.batch} is not divisible by {self.ctx.world} processes x "
                            f"train.grad_accum {self.accum}", key_path="train.batch_size",
                            suggestion=f"use a multiple of {self.ctx.world * self.accum}")
        self.seed = int(self.train["seed"])
        if "seed" not in (recipe.get("train") or {}):  # spelled out in config.json: the run is reproducible from its
            self.recipe = {**self.recipe, "train": {**(self.recipe.get("train") or {}), "seed": self.seed}}  # dir
        data = recipe.get("data") or {}
        with torch.device("meta"):  # the data and the memory are checked before any weights are allocated
            meta_model = zoo.build_model(recipe)
            self.shape = tuple(example_inputs(meta_model)[0].shape[1:])
        dataset = build_dataset(data, self.shape, num_classes(recipe), self.seed)  # missing data: the first error
        data = self._record_trained_classes(recipe, dataset)
        EpochSampler.batches_per_epoch(len(dataset), self.batch, self.ctx.world, self.accum)  # here, not when batches() starts: one message
        self.data_line = data_line(data, len(dataset), self.shape)
        skipped = getattr(dataset, "skipped_note", lambda: None)()  # an image folder's files of other suffixes
        if skipped:
            self.after_banner.append(f"zoo train: note: {skipped}")
        # recorded in each checkpoint: the labels' meaning, as trained (an unconditional model reads none)
        self.classes = class_names(data) if num_classes(recipe) is not None else []
        # FSDP on GPUs: each GPU holds 1/world of the weights, gradients, AdamW state and EMA (checked whole, a
        # model that needs FSDP was refused). Processes on one CPU share its memory: each gets its part of it.
        shards = self.ctx.world if self.fsdp and self.device.type == "cuda" else 1
        per_step = self.ctx.world * self.accum  # micro-batches of one optimizer step
        sharing = self.ctx.on_this_machine if self.device.type == "cpu" else 1
        est = require_training_memory(meta_model, self.train, data, self.device, self.batch // per_step,
                                      shards=shards, per_step=per_step, sharing=sharing)
        if est.unmeasured:
            self.after_banner.append(f"zoo train: note: memory not checked before the first step: {est.unmeasured}")
        self.fd = fd_hook(recipe, self.train, dataset, self.shape, self.out, self.ctx, self.log)  # train.eval_every
        if int(self.train.get("sample_every") or 0) or int(self.train.get("eval_every") or 0):
            check_sample_section(recipe)  # the grids' and evaluations' solver, variance and guidance: now, not at
            # their first step (a run that draws neither keeps its sample section to zoo sample's options)
        self.grids = self._period("sample_every") > 0
        if self.grids:
            try:  # a latent model's VAE: said once now, not as a warning at every grid
                vae_weights(recipe, None, TRAIN_OPTIONS)
            except UserError as err:
                self.grids = False
                self.after_banner.append(f"zoo train: warning: this run draws no sample grids: {err}")
        if self.train["compile"]:
            check_compile_toolchain(self.device)
        if self.device.type == "cuda":
            set_tf32(bool(self.train["tf32"]))
        torch.manual_seed(self.seed)
        self.model = zoo.build_model(recipe).to(self.device).train()
        self.model_name = type(self.model).__name__  # FSDP2 renames the class it shards
        _labels_dropped_by_trainer(self.model)
        if self.train["grad_checkpointing"]:
            set_grad_checkpointing(self.model)
        self.objective = training_objective(recipe, meta_model)
        self.val = val_hook(recipe, self.train, dataset, self.shape, self.objective, self.ctx)  # train.val_every
        self.step, self.created = 0, []
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.train["precision"] == "fp16")
        if resume is not None:
            if self.ctx.main:
                check_unlocked(self.out)  # not while a live run there replaces the checkpoints _load reads
            self._load(Path(resume), allow_recipe_change)
            if self.train.get("init_from"):
                self.after_banner.append("zoo train: note: train.init_from is not read on a resume: the weights "
                                         "are the checkpoint's")
        elif self.train.get("init_from"):
            self._init_from(Path(self.train["init_from"]))
        return dataset

    # -- checkpoints and samples ---------------------------------------------------------------

    def save(self, also_step_dir: bool = True) -> Path:
        """``last/`` (and ``step_XXXXXXX/``): every rank takes part, rank 0 writes (FSDP: each rank its shards).

        Weights that one update with a finite loss and gradient made infinite (a learning rate near
        float32's range) are not saved: the run stops, ``last/`` still the last finite checkpoint."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]  # FSDP: shards
        bad = torch.stack([~torch.isfinite(p).all() for p in local]).sum().float()
        if self.ctx.sum(bad) > 0:
            raise NonFiniteError(self.step, "a weight", self.last_saved, self.last_dir, self.train,
                                 stopped="stopped without saving it",  # an AdamW update is ~lr whatever the gradient
                                 remedy="Lower train.lr (clipping cannot help: an AdamW step is about lr in size, "
                                 "whatever the gradient's)")
        if self.ctx.main and also_step_dir and self.step not in self.created:
            self.created.append(self.step)
        state = {"step": self.step, "created": list(self.created)}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        last = self.out / "last"
        for target in ([self.out / f"step_{self.step:07d}"] if also_step_dir else []) + [last]:
            if self.fsdp:  # sharded model, EMA and optimizer moments + the consolidated weights
                from zoo.training.fsdp_checkpoint import save_sharded

                save_sharded(target, self.ctx, self.model, self.optimizer, self.ema, self.recipe, state,
                             classes=self.classes)
            elif self.ctx.main:
                save_checkpoint(target, self.model, self.recipe, ema=self.ema.state_dict(),
                                state={**state, "optimizer": self.optimizer.state_dict()}, classes=self.classes)
        if self.ctx.main:
            self.created = prune_steps(self.out, self.created, int(self.train["keep_last"]), self.log)
        self.last_saved, self.last_dir = self.step, last
        if self.monitor is not None:
            self.monitor.branch_saved()  # last/ is this run's now: so are log.jsonl and TensorBoard
        self.ctx.barrier()
        return last

    def _check_save_targets(self, total: int) -> None:
        """Refuse now what a save would refuse later: ``last/`` and the ``step_*`` directories this
        run will save over must be zoo checkpoints holding nothing else. Found at the end instead,
        a file of the user's there would fail the save on Ctrl-C or SIGTERM and lose every step since."""
        every = self._period("ckpt_every")
        first = self.step if self.last_saved is None else self.step + 1
        targets = [self.out / "last"]
        if every > 0 and self.out.is_dir():
            for d in sorted(self.out.iterdir()):
                step = int(d.name[5:]) if STEP_NAME.fullmatch(d.name) else -1
                if first <= step <= total and (step % every == 0 or step == total):
                    targets.append(d)
        for target in targets:
            check_replaceable(target)

    def ema_copy(self) -> torch.nn.Module | None:
        """A plain model with the EMA weights on rank 0 (``None`` elsewhere) for grids and evaluations.
        Under FSDP every rank must call: each gathers its EMA shards into rank 0's model."""
        if self.fsdp:
            from zoo.training.fsdp_checkpoint import ema_model

            model = ema_model(self.recipe, self.model, self.ema, self.ctx)
            if model is not None:
                self.stops.cut_short_when_asked(model)
            return None if model is None else model.to(self.device)
        if not self.ctx.main:
            return None
        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        self.stops.cut_short_when_asked(model)
        return model

    def sample_grid(self) -> Path | None:
        from zoo.sample import SampleRequest, load_decoder, sample_latents, save_grid, to_images

        if not self.grids:  # said at the start (every rank agrees: under FSDP ema_copy is collective)
            return None
        model = self.ema_copy()
        if model is None:
            return None
        try:
            x, _ = sample_latents(model, self.recipe, SampleRequest(n=int(self.train["sample_n"])),
                                  device=self.device, options=TRAIN_OPTIONS)  # its messages name recipe keys
            decoder = load_decoder(self.recipe, None, self.device, TRAIN_OPTIONS)  # its messages name data.vae
            images = to_images(x, self.recipe, None, device=self.device, decoder=decoder)
        except UserError as err:  # e.g. a latent model without local VAE weights
            self.log(f"zoo train: warning: no sample grid: {err}")
            return None
        return save_grid(images, self.out / "samples" / f"step_{self.step:07d}.png")

    # -- one step -----------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, unread: bool = False) -> torch.Tensor:
        """One optimizer step on this rank's slice (x, y) of the global batch; returns the global mean loss.

        ``unread``: this rank could not read its slice and (x, y) stands in for it, so that the step's
        collectives complete; every rank then drops the step (:class:`_UnreadOnARank`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.train, self.step)
        local, per_micro = x.shape[0], x.shape[0] // self.accum
        first = self.step * self.batch + self.ctx.rank * local  # global index of this slice's first sample
        dtype = autocast_dtype(self.train["precision"])
        total, total_mse = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.accum):
            sl = slice(i * per_micro, (i + 1) * per_micro)
            d = draw(range(first + sl.start, first + sl.stop), self.seed, self.shape, self.objective).to(x.device)
            xm, ym = x[sl], (y[sl] if self.conditional else None)
            if self.flip:
                xm = torch.where((d.flip < 0.5)[:, None, None, None], xm.flip(-1), xm)
            sync = i == self.accum - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    terms = self.objective(self.forward, xm, ym, draws=d.for_objective())
                    loss = terms["loss"].sum() / local
                self.scaler.scale(loss).backward()
            total += loss.detach()
            total_mse += terms["mse"].float().sum() / local
        # The loss all-reduce also carries each rank's stop request (Ctrl-C, SIGTERM) and whether it read
        # its data, so every rank decides from the same sums to stop after this step. The flags are filled
        # in on the device: a tensor made from a Python number (new_tensor) is a copy that waits for the GPU.
        reduced = self.ctx.sum(torch.stack([total, torch.full_like(total, self.stops.flag),
                                            torch.full_like(total, float(unread)), total_mse]))
        loss, votes, unread_votes = reduced[0] / self.ctx.world, reduced[1], reduced[2]
        self.mse = reduced[3] / self.ctx.world  # the unweighted error, logged where the loss is not it
        self.scaler.unscale_(self.optimizer)
        clip = self.train.get("grad_clip")
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        else:  # the norm alone: clip_grad_norm_(inf) also multiplies every gradient by 1 (~2.5x the time)
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        norm = distributed.full_tensor(norm)
        self.grad_norm = norm.detach()  # before clipping; averaged into the log records
        # The step's one read from the device (it waits for the backward): the NaN check and the stop
        # votes together, so the optimizer step and the EMA update queued below run while the CPU
        # fetches the next batch, instead of a second read at the end of the step waiting for them.
        read = [torch.isfinite(loss), torch.isfinite(norm), votes > 0, unread_votes > 0]
        if self.scaler.is_enabled():  # fp16: the loss scale before this step's update, in the same read
            read.append(self.scaler._get_scale_async().reshape(()))
        finite_loss, finite_grad, self.stop_votes, some_unread, *scale = torch.stack(
            [value.to(torch.float32) for value in read]).tolist()
        finite_loss, finite_grad, self.stop_votes, some_unread = map(bool, (finite_loss, finite_grad, self.stop_votes,
                                                                           some_unread))
        if some_unread:
            self.optimizer.zero_grad(set_to_none=True)
            raise _UnreadOnARank()
        if not finite_loss or (not finite_grad and not self.scaler.is_enabled()):  # fp16: the scaler skips inf steps
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self.step + 1, "the loss" if not finite_loss else "the gradient norm", self.last_saved,
                                 self.last_dir, self.train, updated=_has_updated(self.optimizer))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale and not finite_grad and scale[0] * self.scaler.get_backoff_factor() < 1.0:
            # Each skipped step halves the scale (65536 at the start): below 1 the gradients overflow even
            # unscaled, i.e. the fp16 forward or backward itself is not finite; the steps were all skipped.
            # (Only a skipped step lowers the scale: known from the read above, without GradScaler.get_scale's
            # second wait for the device.)
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self.step + 1, "the fp16 gradient (loss scale below 1, every recent step skipped)",
                                 self.last_saved, self.last_dir, self.train, remedy=FP16_OVERFLOW)
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        return loss

    def _stop_asked(self) -> bool:
        """Whether to stop after this step: one process asks itself; ranks agree by the step's all-reduce."""
        if not self.ctx.distributed:
            return self.stops.received is not None
        return self.stop_votes  # read with the step's NaN check (train_step): no read of the device here

    def _stand_in_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros in the shape of this rank's slice of a batch: a step on it is dropped (see ``train_step``)."""
        local = self.batch // self.ctx.world
        return torch.zeros(local, *self.shape), torch.zeros(local, dtype=torch.long)

    def _stop_here(self) -> None:
        """Save ``last/`` and end the run with :class:`StopRequested` (every rank, at the same step)."""
        signum = self.stops.received  # None: a rank without a signal of its own, stopping with the others
        by = signal.Signals(signum).name if signum is not None else "a signal to another rank"
        self.log(f"zoo train: stopping at step {self.step} ({by}); saving {self.out / 'last'}")
        self.save(also_step_dir=self._every("ckpt_every"))  # a stop on a checkpoint step keeps its step_*
        raise StopRequested(signum, self.step)

    def _keep_steps_before(self, err: UserError | None, first_step: int, every_rank: bool = False) -> None:
        """Save ``last/`` before a data error ends the run, so the steps trained since the last save are
        kept and ``--resume`` goes on once the file is fixed. Under torchrun only when ``every_rank``
        knows of the error (a batch's, agreed in the step's all-reduce); ``err`` is ``None`` on the ranks
        that read their data."""
        if self.ctx.distributed and not every_rank:
            return
        if self.step not in (first_step, self.last_saved):
            self.log(f"zoo train: stopping at step {self.step} (the data could not be read); saving "
                     f"{self.out / 'last'}")
            self.save(also_step_dir=False)
        # a checkpoint to go on from (this save, an earlier one, the resumed one); said by the rank that failed
        if err is not None and self.last_saved is not None:
            err.suggestion = "; ".join(filter(None, [err.suggestion, f"then go on with --resume {self.out}"]))

    def _unless_stopped(self, work: Callable[[], object], what: str) -> None:
        """Run ``work`` (rank 0's grid or evaluation); a stop asked for during it drops the rest of it, and
        the run stops at this step (:meth:`_cut_here`), where a resume does what was dropped."""
        try:
            work()
        except CutShort as cut:
            self.cut = True
            self.log(f"zoo train: {what} of step {self.step} was cut short by {cut}; the run stops now")

    def _last_is_behind(self) -> bool:
        """Whether ``last/`` is an older save than the ``step_*`` this run resumed from and has not saved since
        (a kill between a step's two saves): ``zoo sample RUN`` reads ``last/``. A ``step_*`` older than
        ``last/`` (a branch chosen by hand) leaves it as it is."""
        start = getattr(self, "_resumed_from", None)
        return (start is not None and start.name != "last" and self.last_dir == start and self._resumed_in_place()
                and sealed_at(self.out / "last", CONFIG) < sealed_at(start, CONFIG))

    def _cut_here(self) -> bool:
        """Whether a stop cut this step's grid or evaluation short, every rank agreeing (rank 0 alone draws
        them, so it says): the run then stops at this step. Trained one step further, the resume would start
        after it and never do what the stop dropped. (At the last step the run ends here anyway.)"""
        cut, self.cut = self.ctx.broadcast(self.cut), False
        return cut and self.step < self.total

    def _catch_up_on_the_resumed_step(self, monitor) -> None:
        """The grid, FD and validation loss due at the step the run resumes from, where the run before saved
        that step in this directory and stopped before them (they come after the save: a kill, or a stop that
        cut them short): the resume starts after that step, and they were lost for good. The same EMA weights
        and draws give the values the uninterrupted run had, so the curves and grids have no hole. (A resume
        into another ``--out`` starts a log of its own: nothing of it was lost.)"""
        missing: list[str] | None = None
        if self.ctx.main and self.step > 0 and self._resumed_in_place():
            logged = {key for r in monitor.records if r.get("step") == self.step for key in r}
            then = {**DEFAULTS, **(self._resumed_recipe.get("train") or {})}  # what the run before had due here
            done = {"sample_every": not self.grids or (self.out / "samples" / f"step_{self.step:07d}.png").is_file(),
                    "eval_every": self.fd is None or "fd" in logged,
                    "val_every": self.val is None or "val_loss" in logged}
            def due(key: str) -> bool:  # in the run before, and now (the grid: also the run's last step's)
                period = int(then.get(key) or 0)
                final = key == "sample_every" and self.step == int(then.get("steps") or 0)
                return period > 0 and (self.step % period == 0 or final) and (self._every(key) or final)

            missing = [key for key, was_done in done.items() if due(key) and not was_done]
        missing = self.ctx.broadcast(missing)  # every rank takes part (ema_copy gathers FSDP shards): rank 0's word
        if not missing:
            return
        what = {"sample_every": "sample grid", "eval_every": "FD", "val_every": "validation loss"}
        self.log(f"zoo train: note: step {self.step}'s {', '.join(what[key] for key in missing)} "
                 f"{'was' if len(missing) == 1 else 'were'} not done before the run stopped (they follow its save); "
                 "done now, with the same weights and draws")
        if "sample_every" in missing:
            self._unless_stopped(self.sample_grid, "the sample grid")
        if "eval_every" in missing:
            self._unless_stopped(lambda: evaluation(self.fd, self.ema_copy, self.step, self.ctx, monitor),
                                 "the FD evaluation")
        if "val_every" in missing:
            self._unless_stopped(lambda: evaluation(self.val, self.ema_copy, self.step, self.ctx, monitor),
                                 "the validation loss")
        if self._cut_here():  # a stop during them: at this step again, so the next resume does them
            self._stop_here()

    def _period(self, key: str) -> int:
        """``train.<key>`` as a number of steps; 0 (or unset) = never."""
        return int(self.train.get(key) or 0)

    def _every(self, key: str) -> bool:
        n = self._period(key)
        return n > 0 and self.step % n == 0

    # -- the loop ---------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        """One line for the person watching (rank 0 only): above the progress bar while there is one, so a
        stop or a warning mid-run is not glued onto the bar's line."""
        if self.monitor is not None:
            self.monitor.message(text)
        else:
            self.print(text)

    def banner(self, total: int) -> None:
        params = sum(p.numel() for p in self.model.parameters())  # a DTensor's numel is its full size
        self.log(f"zoo train: run directory {self.out.resolve()}")
        self.log(f"zoo train: {self.model_name} with {params:,} parameters; steps {self.step} -> {total}, "
                 f"global batch {self.batch} (grad_accum {self.accum}), precision {self.train['precision']}")
        self.log(f"zoo train: device {self.ctx.describe()}")
        self.log(f"zoo train: data {self.data_line}")
        if self._period("log_every") > 0:
            grids = ", samples/" if self.grids else ""
            self.log(f"zoo train: watch with `tensorboard --logdir {shlex.quote(str(self.out / 'tb'))}` "
                     f"(loss.png, log.jsonl{grids})")
        else:
            self.log("zoo train: train.log_every is 0: no losses are logged (log.jsonl, loss.png and TensorBoard "
                     "hold only the FDs and validation losses of train.eval_every and val_every, if set)")
        for line in self.after_banner:  # where the weights came from (a resume, train.init_from) and its notes
            self.log(line)
        self.after_banner.clear()
        given = self.recipe.get("train") or {}
        # --steps below train.steps is a part of the run (a resume goes on); above it (a constant schedule) its end
        warmup, last = int(self.train.get("warmup_steps") or 0), max(total, int(self.train["steps"]))
        if warmup and warmup >= last:  # update k (0-based) runs at lr·k/warmup: lr is first reached at k = warmup
            self.log(f"zoo train: note: train.warmup_steps {warmup} is not below the run's last step {last}: the "
                     f"learning rate never reaches train.lr (its last update runs at {(last - 1) / warmup:.2g} x lr)")
        if given.get("min_lr") and self.train.get("lr_schedule", "constant") == "constant":
            self.log("zoo train: note: train.min_lr is set, but lr_schedule is constant: min_lr is where a cosine "
                     "or linear decay ends")
        data = self.recipe.get("data") or {}
        for key in unread_data_keys(data):
            self.log(f"zoo train: note: data.{key} is set, but dataset {data.get('dataset', 'synthetic')!r} "
                     "does not read it")
        if note := unconditional_note(self.recipe):
            self.log(f"zoo train: note: {note}")
        if self.train["precision"] == "fp16" and self.device.type == "cpu" and not _cpu_has_fast_fp16():
            self.log("zoo train: note: this CPU has no fast float16 matmuls (AMX-FP16), so fp16 autocast runs several "
                     "times slower than fp32 here (DiMR emoji demo: 8x); on a CPU use precision bf16 or fp32")
        if note := distributed.restart_note():
            self.log(f"zoo train: note: {note}")
        if note := ignored_stop_note():
            self.log(f"zoo train: note: {note}")
        if self.train["precision"] == "fp32" and self.device.type == "cpu" and _cpu_has_fast_bf16():
            self.log("zoo train: note: this CPU multiplies bfloat16 in hardware (AVX512-BF16/AMX); "
                     "--set train.precision=bf16 may train faster (DiMR emoji demo: ~18% more steps/s, the same losses)")

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``train.steps``) in all; return the records logged by this call."""
        total = int(steps if steps is not None else self.train["steps"])
        lock = RunLock(self.out)
        with distributed.agreement(self.ctx):  # a mistake on rank 0 here stops every rank with one line
            if self.ctx.main:
                try:
                    self.out.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise UserError(f"cannot create the run directory {self.out}: {err.strerror}") from None
                lock.acquire()  # one zoo train at a time in a run directory
                if lock.unlocked:
                    self.print(f"zoo train: warning: {lock.unlocked}")
                self._refuse_a_run_finished_meanwhile(lock)
                repair_run(self.out)  # finish or undo a save a crash interrupted; delete its leftovers
        self.fresh = False  # a later run() continues this run's own checkpoints
        try:
            return self._run(total)
        finally:
            lock.release()

    def _refuse_a_run_finished_meanwhile(self, lock: RunLock) -> None:
        """zoo train checks its ``--out`` when it starts, seconds before the model and data are built and
        the directory is locked: a run there that finished in between (no checkpoint when checked, its
        ``last/`` written since) would be replaced, its log cut short. Checked again under the lock."""
        from zoo.guards import holds_a_run

        found = holds_a_run(self.out) if self.fresh else None
        if found:
            lock.release()
            raise UserError(f"{self.out} now holds a run ({found}), which ended while this one started; a new run "
                            "there would replace its checkpoints and log",
                            suggestion=f"continue it with --resume {self.out}, or choose another --out")

    def close(self) -> None:
        """End the data workers now (``data.num_workers``) rather than when the Trainer is freed; it
        cannot :meth:`run` after this. :func:`train` calls it, however the run ended."""
        self.batches.close()

    def _how_to_go_on(self) -> str:
        """What continues a run with nothing left to train: ``--steps`` only where it may pass the step it
        stopped at (zoo train refuses a ``--steps`` past ``train.steps`` under a decaying schedule)."""
        schedule, steps = self.train.get("lr_schedule", "constant"), int(self.train["steps"])
        if schedule == "constant":
            return "raise train.steps (--set train.steps=N) or --steps to go on"
        stretch = f"--set train.steps=N to go on (the {schedule} decay then stretches to step N)"
        if self.step < steps:
            return f"--steps up to train.steps {steps} goes on; past it, {stretch}"
        return f"{stretch}; --steps cannot pass train.steps {steps}, where the decay ends"

    def _run(self, total: int) -> list[dict]:
        """:meth:`run` once the run directory is this run's."""
        from zoo.training.monitor import Monitor

        first_step, self.total = self.step, total
        with distributed.agreement(self.ctx):
            self._check_save_targets(total)
        self.banner(total)
        if self.step >= total:
            self.log(f"zoo train: note: already at step {self.step}, nothing to train (stops at step {total}); "
                     + self._how_to_go_on())
        with distributed.agreement(self.ctx):  # an unreadable eval_ref: one line, not one per rank
            if self.fd is not None:
                self.fd.prepare()  # the run's FD reference statistics, computed once
        monitor = self.monitor = (Monitor(self.out, self.step, total, self.print, branching=self._branches_away())
                                  if self.ctx.main else None)
        # A fresh request state; handlers restored in the finally below. Under torchrun a Ctrl-C arrives
        # twice (terminal + relay), so there a second signal is no 'stop now'.
        self.stops = StopSignals(second_stops_now=not self.ctx.distributed).install()
        # The FD's pass over its samples calls the extractor alone: it checks for a stop too (the hook comes
        # off in the finally below, as the extractor outlives this run's requests)
        extractor_hook = self.stops.cut_short_when_asked(self.fd.extractor) if self.fd is not None else None
        records, running, running_mse, count = [], torch.zeros((), device=self.device), 0.0, 0
        norms, finite = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        tick = time.perf_counter()
        warm_up = None  # seconds of this process's first step (compilation, Dynamo's import, first allocations)

        def log_window() -> None:
            """One record of the steps since the last: mean loss and gradient norm, speeds (of the
            steps after this process's first, where the window has others: that one compiles and warms up)."""
            nonlocal running, running_mse, norms, finite, count, tick, warm_up
            elapsed, timed = time.perf_counter() - tick, count
            if warm_up is not None and count > 1:
                elapsed, timed = elapsed - warm_up, count - 1
            warm_up = None
            rec = {"step": self.step, "loss": float(running) / count}
            if not self.objective.loss_is_mse:  # Min-SNR weighted, hybrid or multi-scale: the plain error too
                rec["mse"] = float(running_mse) / count
            rec["lr"] = self.optimizer.param_groups[0]["lr"]
            if int(finite):  # the mean over the steps that updated the weights
                rec["grad_norm"] = float(norms) / int(finite)
            if int(finite) < count:
                rec["skipped_steps"] = count - int(finite)
            rec.update(steps_per_s=timed / elapsed, images_per_s=timed * self.batch / elapsed)
            records.append(rec)
            if monitor:
                monitor.record(rec)
            running, norms, finite = (torch.zeros((), device=self.device) for _ in range(3))
            running_mse = 0.0
            count, tick = 0, time.perf_counter()

        try:
            self._catch_up_on_the_resumed_step(monitor)
            while self.step < total:
                unread = None
                try:
                    x, y = next(self.batches)
                except UserError as err:  # a file the data cannot read, found mid-run
                    if not self.ctx.distributed:
                        if count and self._period("log_every") > 0:
                            log_window()
                        self._keep_steps_before(err, first_step)
                        raise
                    unread, (x, y) = err, self._stand_in_batch()  # the other ranks are in this step already
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                started = time.perf_counter() if self.step == first_step else None
                try:
                    running += self.train_step(x, y) if unread is None else self.train_step(x, y, unread=True)
                except _UnreadOnARank:
                    if count and self._period("log_every") > 0:
                        log_window()
                    self._keep_steps_before(unread, first_step, every_rank=True)
                    raise unread or distributed.quiet_stop(self.ctx, "another rank could not read its data") from None
                self.step += 1
                if started is not None:
                    warm_up = time.perf_counter() - started
                running_mse = running_mse + self.mse
                ok = torch.isfinite(self.grad_norm)  # fp16: a step the gradient scaler skipped has an inf norm
                norms += torch.where(ok, self.grad_norm, 0.0)
                finite += ok
                count += 1
                if monitor:
                    monitor.advance()
                stop = self.step < total and self._stop_asked()  # Ctrl-C or SIGTERM: the saved step is the weights' step
                if self._every("log_every") or ((stop or self.step == total) and self._period("log_every") > 0):
                    log_window()  # the last window too, when the run ends or stops between two log steps
                if stop:
                    self._stop_here()
                # Saves, grids and evaluations are left out of the logged steps/s: it is the training speed
                if self._every("ckpt_every"):
                    tick += _seconds(self.save)
                # Rank 0 alone: a stop asked for meanwhile cuts them short, and the run stops at this step
                if self._every("sample_every"):
                    tick += _seconds(lambda: self._unless_stopped(self.sample_grid, "the sample grid"))
                if self._every("eval_every"):
                    tick += _seconds(lambda: self._unless_stopped(
                        lambda: evaluation(self.fd, self.ema_copy, self.step, self.ctx, monitor), "the FD evaluation"))
                if self._every("val_every"):
                    try:  # it reads held-out images: one damaged mid-run is a data error like a batch's
                        tick += _seconds(lambda: self._unless_stopped(
                            lambda: evaluation(self.val, self.ema_copy, self.step, self.ctx, monitor),
                            "the validation loss"))
                    except UserError as err:
                        self._keep_steps_before(err, first_step)
                        raise
                if any(self._every(key) for key in ("sample_every", "eval_every", "val_every")) and self._cut_here():
                    if count and self._period("log_every") > 0:
                        log_window()  # the steps since the last record
                    self._stop_here()
            # Still under the stop handlers: a SIGTERM during the final save lets it finish instead of killing it.
            if self.last_saved != self.step or not is_sealed(self.out / "last", CONFIG) or self._last_is_behind():
                # (gone, truncated or older: resumed from a step_*/ with nothing left to train, it still has to
                # hold this step)
                self.save(also_step_dir=self._period("ckpt_every") > 0)
            if self._period("sample_every") > 0 and first_step < self.step and not self._every("sample_every"):
                self._unless_stopped(self.sample_grid, "the sample grid")  # the final weights' too, between two grids
        except StopRequested:
            raise
        except NonFiniteError:
            if count and self._period("log_every") > 0:
                log_window()  # the finite steps since the last record, the losses that led up to it
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: at once, maybe mid-update, so nothing is saved
            if self.last_saved is not None:
                self.log(f"zoo train: stopped at once; {self.last_dir} holds step {self.last_saved}")
            elif self.ctx.main and (newest := newest_step(self.out)) is not None:  # mid-save: its step_*/ was sealed
                self.log(f"zoo train: stopped at once; {newest} holds the run so far (--resume {self.out} goes on "
                         "from it)")
            raise
        except RuntimeError as err:  # said while the handlers below still hold torchrun's SIGTERM
            if distributed.peer_lost(err):
                distributed.say_peer_lost(self.ctx.rank, err)
            raise
        finally:
            self.stops.restore()
            if extractor_hook is not None:
                extractor_hook.remove()
            if monitor:
                monitor.close()
            self.monitor = None
        return records


def _seconds(work: Callable[[], object]) -> float:
    """How long ``work()`` took."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def train(recipe: dict | str | Path, out: str | Path, steps: int | None = None, device: str | None = None,
          resume: str | Path | None = None, log: Callable[[str], None] = print,
          allow_recipe_change: bool = False, notes: Sequence[str] = ()) -> list[dict]:
    """Build a :class:`Trainer` for ``recipe`` (a resolved recipe, or a recipe file / shipped name) and run
    it; return the logged records. ``notes`` are printed with the run's first lines."""
    if not isinstance(recipe, dict):
        import zoo

        recipe = zoo.load_recipe(recipe)
    trainer = Trainer(recipe, out, device=device, resume=resume, log=log, allow_recipe_change=allow_recipe_change)
    trainer.after_banner[:0] = notes
    try:
        return trainer.run(steps)
    finally:
        trainer.close()
