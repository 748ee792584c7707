"""Data-parallel training under ``torchrun``: DDP, or FSDP2 (``train.parallel: fsdp``).

``torchrun --nproc_per_node N -m zoo train RECIPE ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init` then joins the process group (NCCL on CUDA, gloo on CPU) and gives each rank its
device. Every rank reads its slice of each global batch (``zoo.training.data.batches``) and
draws its samples' noise from their global indices (``zoo.training.draws``), so the gradient
is the same sum whatever N. Only rank 0 logs and writes the consolidated checkpoint files; under
FSDP every rank also writes its shards (:mod:`zoo.training.fsdp_checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zoo.errors import UserError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world`` and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def on_this_machine(self) -> int:
        """The run's processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``): on a CPU they share its memory."""
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if self.distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over all ranks (a copy)."""
        value = value.detach().clone()
        if self.distributed:
            dist.all_reduce(value)
        return value

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self) -> str:
        if not self.distributed:
            return str(self.device)
        return f"{self.world} processes ({dist.get_backend()}), rank 0 on {self.device}"


def check_launch(device: torch.device) -> None:
    """Under torchrun: a device a process group trains on, and no more processes per node than GPUs.

    Every rank checks before any joins the group, so the mistake is one line (rank 0's), not a
    CUDA error from the ranks beyond the last GPU while the others wait for them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: under torchrun zoo runs on CUDA GPUs (NCCL) or on the CPU (gloo)",
                        suggestion="use --device cuda or --device cpu")
    check_gpus_per_node(device)


def check_gpus_per_node(device: torch.device) -> None:
    """Under torchrun on CUDA, each process of a node takes the GPU of its ``LOCAL_RANK``: there must be as many."""
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and per_node > gpus:
        raise UserError(f"torchrun --nproc_per_node {per_node}: this node has {gpus} CUDA GPU{'s' * (gpus != 1)}, "
                        "and every process runs on a GPU of its own",
                        suggestion=f"use --nproc_per_node {gpus} (or fewer), or --device cpu")


# How long a rank waits in a collective for the others. Rank 0 alone computes the FD reference (inside
# the setup's agreement), evaluates, draws grids and writes DDP checkpoints while the other ranks wait in
# a barrier or all-gather: on the CPU (gloo, torch's 30 min) that wait was fine, but NCCL's default is
# 10 min, past which its watchdog kills the whole run. One timeout for both backends: gloo's.
COLLECTIVE_TIMEOUT = dist.default_pg_timeout


def init(device: str | None = None) -> Context:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return Context(device=torch.device(wanted))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(wanted).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None,
                                store=restart_safe_store(), rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return Context(rank=rank, world=world, device=torch.device("cuda", local) if cuda else torch.device("cpu"))


def restart_safe_store() -> dist.Store | None:
    """The store of this attempt of a one-node ``torchrun --max-restarts`` run, or None for torch's own.

    torchrun's agent serves one store for the whole job (``TORCHELASTIC_USE_AGENT_STORE``), and the
    processes of a restart joined it under the same keys as the processes they replace: a restarted
    rank read a dead rank's address or NCCL id and failed to connect (gloo: "connectFullMesh failed
    ... Connection refused"), so no restart ever trained. On one node each attempt gets its own key
    prefix, the agent's restart count, which all its processes share. Across nodes the agents count
    differently (an agent whose processes were still healthy restarts them for the others without
    counting), so no prefix is agreed there: torch's store is kept and :func:`restart_note` says what
    to set instead."""
    if not _shares_agent_store() or _nodes() > 1:
        return None  # plain env:// (a store of this attempt's own), the agent store off, or several nodes
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=dist.constants.default_pg_timeout)
    return dist.PrefixStore(f"zoo/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def restart_note() -> str | None:
    """What to set for ``torchrun --max-restarts`` across nodes, where :func:`restart_safe_store` cannot help."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and _nodes() > 1 and _shares_agent_store():
        return ("torchrun --max-restarts on several nodes: restarted processes read the dead ones' addresses from "
                "torchrun's shared store and cannot connect (a torch bug); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node for restarts that work")
    return None


def _shares_agent_store() -> bool:
    """Whether torchrun's agent hands its own store, kept across restarts, to the processes."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _nodes() -> int:
    """How many torchrun agents (nodes) the run has."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1"))


@contextlib.contextmanager
def agreement(ctx: Context) -> Iterator[None]:
    """Run a block that has no collectives inside on every rank, and stop every rank if it failed on any.

    A mistake in a run's setup (a recipe value, a missing data root, a bad checkpoint) usually
    fails on every rank alike, sometimes on one only (a file one rank cannot read). Without this,
    torchrun showed the same line once per rank, and ranks that got past the mistake died later
    in a collective with a connection traceback. Here the ranks compare notes once: rank 0
    raises the mistake (each distinct message once, naming the ranks where not all failed, unless
    only rank 0 did: mostly work that rank 0 alone does, such as the FD reference); the
    other ranks raise a quiet :class:`UserError` the CLI does not print; a bug (any other
    exception) keeps its traceback on its own rank.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001  (every rank must reach the gather below)
        error = err
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    notes: list[Any] = [None] * ctx.world
    if error is not None:  # what the other ranks need to know: a mistake's line, or a bug's type
        note = (str(error), False) if isinstance(error, UserError) else (type(error).__name__, True)
    else:
        note = None
    dist.all_gather_object(notes, note)
    failed = [(rank, n) for rank, n in enumerate(notes) if n is not None]
    if not failed:
        return
    if error is not None and not isinstance(error, UserError):
        raise error
    if not ctx.main:
        raise quiet_stop(ctx, "rank 0 reports why")
    distinct = list(dict.fromkeys(n for _, n in failed))
    # the same mistake everywhere, or on rank 0 alone (mostly work only rank 0 does: a reference, the run
    # directory): rank 0's own error, with its file, key and hint, and no rank named as if it were special
    if len(distinct) == 1 and isinstance(error, UserError) and (len(failed) == ctx.world or failed[0][0] == 0
                                                                 and len(failed) == 1):
        raise error
    parts = []
    for text, bug in distinct:
        ranks = [rank for rank, n in failed if n == (text, bug)]
        where = f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}"
        parts.append(f"{where}: a {text} (its traceback is above)" if bug else f"{where}: {text}")
    raise UserError("; ".join(parts))


def quiet_stop(ctx: Context, why: str) -> UserError:
    """The error a rank stops with when another rank reports the reason: the CLI prints nothing for it."""
    quiet = UserError(f"rank {ctx.rank}: stopped with the run ({why})")
    quiet.quiet = True
    return quiet


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "remote process exited")


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank of the run has stopped."""
    return dist.is_initialized() and (isinstance(err, dist.DistError) or any(s in str(err) for s in _PEER_GONE))


def say_peer_lost(rank: int, err: BaseException) -> None:
    """Print, once per error, that this rank stopped because another one did (whose own message says
    why). The loop says it while its stop handlers still hold a SIGTERM: torchrun terminates the other
    ranks as soon as one exits, which killed a rank mid-unwinding before the CLI could say it."""
    if not getattr(err, "zoo_peer_lost_said", False):
        err.zoo_peer_lost_said = True  # type: ignore[attr-defined]
        print(f"zoo train: error: rank {rank} stopped: another process of the run stopped first "
              "(its own message says why)", file=sys.stderr, flush=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context, parallel: str = "ddp", precision: str = "fp32") -> nn.Module:
    """``model`` as this run trains it: itself (one process), DDP, or FSDP2-sharded in place."""
    if not ctx.distributed:
        return model
    if parallel == "fsdp":
        return shard_fsdp(model, precision)
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # A depthwise convolution's weight gradient (C, 1, k, k) from channels-last inputs has another
    # stride on its size-1 axis than the bucket: the same elements in the same order, which DDP
    # copies into the bucket as it copies every gradient. Its warning, once per rank, says nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    # gradient_as_bucket_view: the gradients are views into DDP's buckets, not a second copy of them (4 bytes a
    # parameter more per GPU, ~3.9 GiB at DiMR-G/2R, and a copy each step that the memory check did not count)
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the entries of every ``ModuleList`` of blocks."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "in_blocks", "out_blocks"):
            out.extend(module)
        elif name.endswith("mid_block"):
            out.append(module)
    return out


def shard_fsdp(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root; bf16/fp16 compute with fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # cast_forward_inputs off: the time input stays float32/64 (in bf16, 1000 DDPM steps fall on ~507 distinct
    # values, which sampling never sees); the loop's autocast casts what the matmuls read, as under DDP
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                  cast_forward_inputs=False)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if dist.get_backend() == "gloo":
        # gloo's reduce-scatter took ReduceOp.AVG for SUM before torch 2.9: FSDP's gradients came out N
        # times too large. A sum, then FSDP's own division by N, is right on every version.
        for module in (*blocks_of(model), model):
            module.set_force_sum_reduction_for_comms(True)
    return model


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor shard gathered into the whole tensor (every rank must call); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (FSDP2 shards in place: the module itself)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
