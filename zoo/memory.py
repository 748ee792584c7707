"""Will a run fit? Memory a training or sampling run needs, estimated before anything is allocated.

The model is built on the meta device (no weights), so its parameters are counted exactly and
one meta forward pass at batch 1 measures what autograd keeps for the backward pass (every
saved tensor that is not a parameter, each storage once). Attention is counted as a fused
kernel keeps it (q, k, v and the output, no L×L matrix). Blocks that recompute their activations
in backward (``torch.utils.checkpoint``: a model's ``set_grad_checkpointing``, per branch in DiMR)
save only their inputs, and the count sees exactly that, plus the largest such block's whole
activations, which its backward holds again (a second count with the switches off measures them), so
the estimate follows the model's recomputation switches as they are set. Measured tensor peaks of a
step on the emoji32 recipes are 5-16% below the activation estimate with recomputation and 3-5% below
it without (the estimate holds all gradients and activations at once). Training holds per parameter fp32
weights, gradients, AdamW's two moments and the fp32 EMA (20 bytes); sampling holds the weights
and, per sample, the largest activation a few times over (no autograd graph). The estimate is
compared with the memory the device has free (``MemAvailable`` from ``/proc/meminfo`` or
``os.sysconf`` on CPU, ``torch.cuda.mem_get_info`` on CUDA); a run that cannot fit is one
message with both numbers and the largest batch that would, instead of an out-of-memory kill.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from zoo.errors import UserError
from zoo.meta import NotOnMeta, example_inputs, meta_forward, without_dynamo
from zoo.options import CommandOptions, EVAL_OPTIONS
from zoo.training.sections import data_setting

GRAD_BYTES_PER_PARAM = 4  # an fp32 gradient, there during a step only (zero_grad(set_to_none=True))
STEP_BYTES_PER_PARAM = 4 + GRAD_BYTES_PER_PARAM + 8  # fp32 weights, gradients, AdamW exp_avg + exp_avg_sq
EMA_BYTES_PER_PARAM = 4  # the fp32 EMA copy a training run keeps beside them
TRAIN_BYTES_PER_PARAM = STEP_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM
SAMPLE_ACTIVATION_COPIES = 4  # live tensors around the largest one in a no-grad forward


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs: ``fixed`` (weights and optimizer state, data held in memory) + ``per_sample`` × batch."""

    params: int
    fixed: int
    per_sample: int
    unmeasured: str = ""  # why the activations could not be measured (a model that cannot run on meta)

    def total(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch

    def largest_batch(self, free: int) -> int:
        """The largest batch that fits in ``free`` bytes (0: not even one sample)."""
        return (free - self.fixed) // self.per_sample if self.per_sample and free > self.fixed else 0


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while measuring: saves what a fused kernel saves (q, k, v, out)."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, is_causal, scale):  # type: ignore[override]
        with torch.no_grad():
            out = _SDPA(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise RuntimeError("the memory estimate never runs backward")


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        return _FusedAttention.apply(q, k, v, dropout_p, is_causal, scale)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def activation_bytes(model: nn.Module, training: bool = True) -> int:
    """Per sample: bytes autograd saves for backward (``training``) or the largest activation (not).

    ``model`` is on the meta device and has ``example_inputs(batch)``; nothing is allocated. A model
    whose forward cannot run on meta tensors raises :class:`~zoo.meta.NotOnMeta`.
    """
    params = {id(p) for p in model.parameters()}

    def count(per_module: dict[nn.Module, int] | None = None) -> dict[int, int]:
        """Bytes of each storage autograd saves; ``per_module``: what each module's call added (its largest)."""
        storages: dict[int, int] = {}
        keep: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            base = tensor._base if tensor._base is not None else tensor
            if id(base) not in params and id(tensor) not in params:
                storage = tensor.untyped_storage()
                storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
                keep.append(tensor)  # so no storage address is reused while counting
            return tensor

        starts: list[int] = []
        handles = [] if per_module is None else [h for m in model.modules() for h in (
            m.register_forward_pre_hook(lambda *_: starts.append(sum(storages.values()))),
            m.register_forward_hook(lambda mod, *_: per_module.__setitem__(
                mod, max(per_module.get(mod, 0), sum(storages.values()) - starts.pop()))))]
        try:
            with torch.device("meta"):
                inputs = example_inputs(model)
            with saved_tensors_hooks(pack, lambda t: t), _fused_attention(), torch.enable_grad():
                meta_forward(model, *inputs)
        finally:
            for handle in handles:
                handle.remove()
        return storages

    # Meta kernels written in Python (torch.arange's, say) would import Dynamo: 2-3 s of every
    # `zoo sample`, for nothing the count needs.
    if not training:
        return SAMPLE_ACTIVATION_COPIES * max(without_dynamo(count).values(), default=0)
    return sum(without_dynamo(count).values()) + recomputed_block_bytes(model, count)


def recomputed_block_bytes(model: nn.Module, count: Callable[..., dict[int, int]]) -> int:
    """Per sample: the largest recomputing block's activations, which its backward holds again (0 where no
    block recomputes). ``count(per_module)`` is :func:`activation_bytes`' counter: it is run with the
    model's ``grad_checkpointing`` switches as set and with them off; a block that recomputes saves
    nothing during its call (checkpoint keeps its inputs itself), the same block without saves it all."""
    switches = {m: m.grad_checkpointing for m in model.modules()
                if isinstance(getattr(m, "grad_checkpointing", None), bool)}
    if not any(switches.values()):
        return 0
    recomputing: dict[nn.Module, int] = {}
    full: dict[nn.Module, int] = {}
    without_dynamo(lambda: count(recomputing))
    try:
        for module in switches:
            module.grad_checkpointing = False
        without_dynamo(lambda: count(full))
    finally:
        for module, flag in switches.items():
            module.grad_checkpointing = flag
    return max((n for m, n in full.items() if n > 0 and recomputing.get(m, 0) == 0), default=0)


def estimate(model: nn.Module, training: bool = True, half_precision: bool = False,
             extra_bytes: int = 0, ema: bool = True, shards: int = 1) -> Estimate:
    """What a run of the meta-device ``model`` needs (see the module docstring); ``ema=False``
    leaves out the EMA copy (a bare optimizer step, as benchmarks time it); ``shards``: the FSDP
    processes that each hold that part of the weights, gradients, AdamW state and EMA."""
    params = sum(p.numel() for p in model.parameters())
    per_param = (STEP_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM * ema) if training else 4
    fixed = params * per_param // max(1, shards) + extra_bytes
    per_sample = activation_bytes(model, training)
    if half_precision:  # bf16/fp16 autocast keeps most activations in 2 bytes
        per_sample //= 2
    return Estimate(params, fixed, per_sample)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes, or ``None`` where it cannot be told."""
    if device.type == "cuda":
        try:  # the driver's free memory plus what PyTorch's caching allocator holds unused (a run's freed
            # activations, which a sample grid between training steps reuses)
            return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
                torch.cuda.memory_allocated(device)
        except Exception:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def gib_apart(need: float, free: float) -> tuple[str, str]:
    """``need`` and ``free`` in one unit and as many decimals (up to 3) as it takes to read apart: a
    refusal said "needs about 0.3 GiB ... has 0.3 GiB free"."""
    scale, unit, digits = (2**30, "GiB", 1) if max(need, free) >= 2**28 else (2**20, "MiB", 0)
    while digits < 3 and round(need / scale, digits) == round(free / scale, digits):
        digits += 1
    return f"{need / scale:.{digits}f} {unit}", f"{free / scale:.{digits}f} {unit}"


def require_memory(model: nn.Module, device: torch.device | str, batch: int, training: bool = True,
                   half_precision: bool = False, extra_bytes: int = 0, batch_key: str = "train.batch_size",
                   available: int | None = None, shards: int = 1, per_step: int = 1, sharing: int = 1) -> Estimate:
    """Raise a :class:`UserError` if a run of the meta-device ``model`` at ``batch`` cannot fit on ``device``.

    ``available`` overrides the measured free memory (tests); ``shards``: see :func:`estimate`;
    ``per_step``: the micro-batches of ``batch`` in one ``batch_key`` (processes x gradient
    accumulation), so that the hint names the key's own value; ``sharing``: the processes of the run
    on this machine that share ``device``'s memory (DDP on one CPU), each needing the estimate.
    Returns the estimate.
    """
    device = torch.device(device)
    free = available_bytes(device) if available is None else available
    if free is None:  # nothing to compare with: measure nothing
        return Estimate(0, 0, 0)
    free //= max(1, sharing)  # each process's part
    try:
        est = estimate(model, training, half_precision, extra_bytes, shards=shards)
    except NotOnMeta as err:  # a plugin's data-dependent code: the model may well run on real tensors
        return Estimate(0, 0, 0, unmeasured=str(err))
    need = est.total(batch)
    if need <= free:
        return est
    what = "weights, gradients, AdamW state and EMA" if training else "weights"
    parts = f"{gib(est.fixed)} for {est.params:,} parameters' {what}" + (f" (its 1/{shards} share)" if shards > 1 else "")
    if extra_bytes:
        parts += f" (incl. {gib(extra_bytes)} of data)"
    fits = est.largest_batch(free)
    hint = (f"use {batch_key} <= {fits * per_step}" + (" or train.grad_accum / train.grad_checkpointing" if training
                                                         else "")
            if fits >= 1 else "use a smaller model or a device with more memory")
    at = (f"batch {batch}" if per_step == 1 else
          f"micro-batch {batch}, {batch_key} {batch * per_step} in {per_step} parts (processes x train.grad_accum)")
    share = f" (1/{sharing} for each of the {sharing} processes on it)" if sharing > 1 else ""
    needed, freed = gib_apart(need, free)
    raise UserError(f"this run needs about {needed} ({parts} + {gib(est.per_sample * batch)} of activations at "
                    f"{at}) but the {device.type} device has {freed} free{share}",
                    key_path=batch_key if fits >= 1 else None, suggestion=hint)


def allocation_failed(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's refusal: CUDA's ``OutOfMemoryError``, the CPU allocator's
    "can't allocate memory" / "not enough memory" ``RuntimeError``, or Python's ``MemoryError``."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator" in str(err)


@contextlib.contextmanager
def out_of_memory_said(suggestion: str) -> Iterator[None]:
    """An allocation that fails inside is one :class:`UserError` with ``suggestion`` (the options to
    lower) instead of an allocator traceback: for what no estimate covers before it runs."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not allocation_failed(err):
            raise
        tried = str(err).split("you tried to allocate ")[-1].split(" bytes")[0]
        size = f" (an allocation of {gib(int(tried))} failed)" if tried.isdigit() else ""
        raise UserError(f"out of memory{size}", suggestion=suggestion) from None


def require_training_memory(meta_model: nn.Module, train: dict, data: dict, device: torch.device,
                            micro_batch: int, shards: int = 1, per_step: int = 1, sharing: int = 1) -> Estimate:
    """:func:`require_memory` for ``zoo train``: the recipe's precision, checkpointing and in-memory data;
    ``shards``: the processes FSDP shards the weights and their state over, each with a GPU of its own;
    ``per_step``: micro-batches per optimizer step (processes x ``train.grad_accum``); ``sharing``: the
    processes on this machine that share the device's memory (DDP on a CPU)."""
    if train.get("grad_checkpointing") and callable(getattr(meta_model, "set_grad_checkpointing", None)):
        meta_model.set_grad_checkpointing(True)
    extra = 0
    if data_setting(data, "dataset") == "synthetic":  # held in memory as float32 images + int64 labels
        with torch.device("meta"):
            x = example_inputs(meta_model)[0]
        extra = int(data.get("size", 64)) * (x[0].numel() * 4 + 8)
    return require_memory(meta_model, device, micro_batch, training=True,
                          half_precision=train.get("precision") in ("bf16", "fp16"), extra_bytes=extra, shards=shards,
                          per_step=per_step, sharing=sharing)


def require_weights_memory(recipe: dict, device: torch.device | str, bytes_per_param: int = 4) -> None:
    """Before a model is built or loaded for sampling: its weights alone must fit in ``device``'s free
    memory (counted on the meta device), else one line instead of an allocator traceback or the OOM killer."""
    import zoo

    device = torch.device(device)
    free = available_bytes(device)
    if free is None:
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in zoo.build_model(recipe).parameters())
    if params * bytes_per_param > free:
        needed, freed = gib_apart(params * bytes_per_param, free)
        raise UserError(f"the model's {params:,} parameters need {needed} of weights but the {device.type} device "
                        f"has {freed} free", suggestion="use a smaller model or a device with more memory")


def require_sampling_memory(recipe: dict, device: torch.device | str, batch: int, guided: bool,
                            options: CommandOptions = EVAL_OPTIONS) -> Estimate:
    """:func:`require_memory` for sampling a loaded model (its weights are already out of the free memory);
    ``options``: what the message calls the caller's batch size option (zoo train's is a recipe key)."""
    import zoo

    with torch.device("meta"):
        meta_model = zoo.build_model(recipe)
    try:
        est = estimate(meta_model, training=False)
    except NotOnMeta as err:
        return Estimate(0, 0, 0, unmeasured=str(err))
    free = available_bytes(torch.device(device))
    rows = batch * (2 if guided else 1)  # guidance runs the conditional and unconditional halves together
    if free is None or est.per_sample * rows <= free:
        return est
    fits = free // (est.per_sample * (2 if guided else 1))
    needed, freed = gib_apart(est.per_sample * rows, free)
    raise UserError(f"sampling {batch} images per batch{' with guidance' if guided else ''} needs about "
                    f"{needed} of activations but the {torch.device(device).type} device has {freed} free",
                    suggestion=f"use {options.given('batch_size', fits)} or less" if fits >= 1 and fits < batch
                    else "use a smaller model or a device with more memory")
