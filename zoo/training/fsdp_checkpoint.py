"""Sharded checkpoints for ``train.parallel: fsdp``, written with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory of an FSDP run holds, beside the consolidated ``model.safetensors`` /
``ema.safetensors`` that every zoo command reads (gathered to rank 0 and written by it), the
run's sharded state: the model, the EMA shadows and the AdamW moments, each rank writing its own
shards (``__RANK_0.distcp``, fsynced) and rank 0 the index (``.metadata``). All of it goes into
one temporary directory that rank 0 seals with ``config.json`` once every rank has written (the
protocol of :mod:`zoo.atomic`): a crash before the seal leaves the previous checkpoint in place,
after it the new one is installed, so no rank's shard is ever half in a checkpoint.

Resuming reads the shards onto however many processes the new run has (DCP matches the saved
pieces to the new ones: FSDP on N processes to FSDP on M, to DDP or to one process). Only
tensors go into the shards; the index is read with an unpickler that admits only DCP's own
metadata classes, so a checkpoint cannot run code when it is resumed.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from zoo.checkpoint import SHARD_FILE, save_checkpoint
from zoo.errors import UserError
from zoo.training.distributed import Context, full_tensor
from zoo.training.ema import EMA

INDEX = ".metadata"  # DCP's name for the index of a sharded checkpoint


def is_sharded(directory: str | Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (written by an FSDP run)."""
    return (Path(directory) / INDEX).is_file()


def consolidate(state: Mapping[str, Tensor], ctx: Context) -> dict[str, Tensor]:
    """The whole tensors of a sharded state dict on rank 0 (CPU), ``{}`` elsewhere; every rank must call.

    Gathered one tensor at a time: the other ranks never hold more than one whole tensor. Plain
    (unsharded) tensors on the CPU come back as they are, not copied.
    """
    out = {}
    for name, value in state.items():
        whole = full_tensor(value.detach())
        if ctx.main:
            out[name] = whole.cpu()
    return out


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                   with_optimizer: bool) -> dict[str, Any]:
    """``{model, ema[, optimizer]}``: this rank's shards keyed by parameter name (DCP's layout).

    Only the optimizer's per-parameter tensors (``step``, ``exp_avg``, ``exp_avg_sq``) are kept;
    its hyperparameters come from the recipe on resume, as for a fresh optimizer.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model), "ema": dict(ema.state_dict())}
    if with_optimizer:  # (an optimizer without state would be stepped once with zero gradients to make one)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    return state


def save_sharded(directory: str | Path, ctx: Context, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: EMA, config: Mapping[str, Any], trainer_state: Mapping[str, Any],
                 classes: Sequence[str] = ()) -> Path:
    """Write an FSDP run's checkpoint ``directory`` crash-safely; every rank calls it (``classes`` as
    :func:`zoo.checkpoint.save_checkpoint` records them).

    ``trainer_state`` (step, scaler, ...) is what rank 0 stores in ``trainer_state.pt``; the
    optimizer's moments go into the shards instead.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    with_optimizer = bool(optimizer.state)
    shards = _sharded_state(model, optimizer, ema, with_optimizer)
    model_full, ema_full = consolidate(model.state_dict(), ctx), consolidate(ema.state_dict(), ctx)
    if not ctx.main:
        tmp = ctx.broadcast(None)  # rank 0 names the temporary directory it made
        if tmp is None:
            raise UserError(f"rank 0 could not write checkpoint {directory} (its error says why)")
        dcp.save(shards, storage_writer=FileSystemWriter(tmp, sync_files=True))
        return Path(directory)

    started = False

    def write_shards(tmp: Path) -> None:
        nonlocal started
        started = True
        ctx.broadcast(str(tmp))
        dcp.save(shards, storage_writer=FileSystemWriter(tmp, sync_files=True))  # returns once all ranks wrote

    state = {**trainer_state, "sharded_optimizer": with_optimizer}
    try:
        return save_checkpoint(directory, model_full, config, ema=ema_full, state=state,
                               also=write_shards, classes=classes)
    except BaseException:
        if not started and ctx.distributed:
            ctx.broadcast(None)  # the other ranks wait for a directory: tell them there is none
        raise


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                 trainer_state: Mapping[str, Any]) -> None:
    """Load a sharded checkpoint's model, EMA and optimizer moments into this run's (sharded or not) objects.

    Every rank calls it (collective under a process group). Strict: a tensor this run has and
    the checkpoint lacks is an error naming the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    directory = Path(directory)
    reader = shard_reader(directory)
    reader.read_metadata()  # a foreign or hostile index: one clear error on every rank, before any collective
    with_optimizer = bool(trainer_state.get("sharded_optimizer", False))
    state = _sharded_state(model, optimizer, ema, with_optimizer)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it reads without a process group, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader)
    except CheckpointException as err:  # a rank's failure (a missing key, a wrong shape), wrapped by DCP
        first = next(iter(err.failures.values()))[0]
        if isinstance(first, UserError):
            raise first from None
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
        raise UserError(f"cannot resume from the shards in {directory}: {reason[:300]}") from None
    set_model_state_dict(model, state["model"])  # (the EMA shadows were loaded in place: DCP fills the given tensors)
    if with_optimizer:
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]  # this recipe's hyperparameters
        set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": groups})


def ema_model(recipe: Mapping[str, Any], model: nn.Module, ema: EMA, ctx: Context) -> nn.Module | None:
    """The EMA weights (and the model's buffers) in a plain, unsharded model on rank 0 (CPU);
    ``None`` on the other ranks. Every rank must call: the shards are gathered."""
    import zoo
    from zoo.weights import build_with_state

    params = {name for name, _ in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k not in params}  # not shared with training
    state = consolidate({**buffers, **ema.state_dict()}, ctx)
    return build_with_state(lambda: zoo.build_model(dict(recipe)), state, "the EMA") if ctx.main else None


def optimizer_state_by_name(state: Mapping[str, Any]) -> dict[str, Any]:
    """A plain ``optimizer.state_dict()`` keyed by parameter name instead of position, as FSDP loads it.

    zoo's parameter groups list their parameters' ``names`` (:mod:`zoo.training.optim`) in order.
    """
    names: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        if len(group.get("names", ())) != len(group["params"]):
            raise UserError("the checkpoint's optimizer state does not name its parameters; "
                            "it cannot be resumed under train.parallel: fsdp", suggestion="resume it with ddp")
        names.update(zip(group["params"], group["names"]))
        groups.append({**group, "params": list(group["names"])})
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


# ----------------------------------------------------------------------------- safe reading

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "pathlib._local":  # where Python 3.13+ pickles pathlib's classes: older Pythons lack it
            module = "pathlib"
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self.path) / INDEX
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
                raise UserError(f"cannot read the shard index {path}: {err}") from None
            try:
                objects = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
                files = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
            except (AttributeError, TypeError):
                objects, files = None, []
            if not isinstance(metadata, Metadata) or objects is None:
                raise UserError(f"shard index {path} is not a checkpoint index")
            foreign = [f for f in files if not SHARD_FILE.match(f)]
            if objects or foreign:
                what = f"objects ({', '.join(objects[:3])})" if objects else f"files zoo does not write ({foreign[0]})"
                raise UserError(f"shard index {path} lists {what}; zoo writes tensors only and will not load it")
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def shard_reader(directory: Path) -> Any:
    """A DCP ``FileSystemReader`` for ``directory`` that reads the index safely (see the module docstring)."""
    return _reader_class()(directory)
