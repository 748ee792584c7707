"""What a run on CUDA GPUs does differently, checked on the CPU.

No GPU runs these tests: each one stands in for what CUDA would do. A read of a tensor's value into
Python (``bool``, ``item``, ``tolist``, a tensor made from a Python number) waits for everything
queued on the GPU, so the tests count them; the ``meta`` device stands in for the GPU where a CPU
tensor or generator meets a device tensor; NCCL's settings are read off ``init_process_group``.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import zoo
from zoo.training import Trainer, distributed, loop
from zoo.training.distributed import Context

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"
SMALL = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1", "train.warmup_steps=0",
         "train.batch_size=8"]
QUIET = lambda *_: None  # noqa: E731


class HostReads(TorchFunctionMode):
    """Records the reads of a tensor's value into Python (and tensors made from Python numbers, a copy
    to the device) made directly by the code of ``filename`` (in its ``function`` only, if given): on
    CUDA each one waits for the GPU."""

    READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "new_tensor"}

    def __init__(self, filename: str, function: str | None = None) -> None:
        super().__init__()
        self.filename, self.function, self.names = filename, function, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1).f_code
        if name in self.READS and caller.co_filename == self.filename and self.function in (None, caller.co_name):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


class TwoRanks(Context):
    """Rank 0 of two whose collectives sum two equal halves (what an all-reduce of two such ranks gives)."""

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value.detach().clone() * 2


def test_a_training_step_under_torchrun_waits_for_the_gpu_once(tmp_path):
    """The stop vote was a second read at the end of each step (``bool(stop_votes > 0)``), after the
    optimizer step and the EMA update were queued, so the CPU waited for them instead of fetching the
    next batch meanwhile; and the stop flag went to the device as ``new_tensor``, a copy that waits
    for the backward. Now the NaN check and the stop vote are one read."""
    trainer = Trainer(zoo.load_recipe(RECIPE, SMALL), tmp_path, log=QUIET)
    try:
        trainer.ctx = TwoRanks(rank=0, world=2)
        x, y = next(trainer.batches)
        with HostReads(loop.__file__) as reads:
            trainer.train_step(x[:4], y[:4])
            assert trainer._stop_asked() is False
        assert reads.names == ["tolist"]
        trainer.stops.received = signal.SIGTERM  # this rank's Ctrl-C or SIGTERM: every rank stops after the step
        trainer.train_step(x[:4], y[:4])
        assert trainer._stop_asked() is True
    finally:
        trainer.close()


def test_nccl_waits_as_long_as_gloo_while_rank_0_works_alone(monkeypatch):
    """Rank 0 alone computes the FD reference, evaluates and writes DDP checkpoints while the others wait
    in a collective: gloo waits 30 min, NCCL's default was 10, past which its watchdog ended the run."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for key, value in {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(key, value)
    ctx = distributed.init("cuda")
    assert ctx.device == torch.device("cuda", 3)
    (args, kwargs), = calls
    assert args == ("nccl",) and kwargs["device_id"] == torch.device("cuda", 3)
    assert kwargs["timeout"] >= timedelta(minutes=30) == dist.default_pg_timeout


class MovesOf(TorchFunctionMode):
    """Counts ``Tensor.to`` calls on the given tensors (copies to another device)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__()
        self.tensors, self.count = tensors, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "to" and any(args[0] is t for t in self.tensors):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_schedule_tables_go_to_the_device_once():
    """The float64 tables (ᾱ, posterior coefficients) were copied from the CPU at every gather: up to
    ten copies per micro-batch with the hybrid loss, each waiting for the GPU's queue."""
    from zoo.diffusion.discrete import DiscreteDiffusion

    d = DiscreteDiffusion(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    x0 = torch.empty(4, 3, 8, 8, device="meta")  # stands in for the GPU
    index = torch.tensor([0, 5, 999, 500], device="meta")
    with MovesOf(d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod, d.posterior_mean_coef_x0,
                 d.posterior_mean_coef_xt) as moves:
        for _ in range(3):
            d.q_sample(x0, index, x0)
            d.posterior(x0, x0, index)
    assert moves.count == 4  # each table once
    cpu = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(d.q_sample(cpu, index.new_tensor([0, 5, 999, 500], device="cpu"), cpu),
                               d.alphas_cumprod[[0, 5, 999, 500]].sqrt().view(-1, 1, 1, 1) * cpu
                               + (1 - d.alphas_cumprod[[0, 5, 999, 500]]).sqrt().view(-1, 1, 1, 1) * cpu)


def test_the_draws_go_to_the_gpu_from_pinned_memory_without_waiting(monkeypatch):
    """Each micro-batch's draws (times, noise, label-drop and flip uniforms) are made on the CPU. They
    went to the GPU as four copies from pageable memory, each of which first waits for the GPU's queue:
    the CPU could not prepare the next micro-batch meanwhile. Now each goes from pinned memory,
    non-blocking; on the CPU nothing is copied."""
    from zoo.diffusion.setup import build_objective
    from zoo.training.draws import draw

    d = draw(range(8, 12), 0, (4, 8, 8), build_objective(zoo.load_recipe(RECIPE, [])))
    assert d.to(torch.device("cpu")) is d
    pinned, moves = [], []

    def pin_memory(self):
        pinned.append(self)
        return self

    def to(self, *args, **kwargs):  # no GPU here: records the copy and stays on the CPU
        moves.append((self, torch.device(args[0]), kwargs.get("non_blocking", False)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    d.to(torch.device("cuda", 0))
    fields = [d.t, d.noise, d.drop, d.flip]
    assert [id(t) for t in pinned] == [id(t) for t in fields]
    assert [(id(t), dev.type, nb) for t, dev, nb in moves] == [(id(t), "cuda", True) for t in fields]


class GeneratorDevices(TorchFunctionMode):
    """Raises as CUDA does when a generator is asked to draw on a device of another type."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator, device = kwargs.get("generator"), kwargs.get("device")
        if generator is not None and device is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return func(*args, **kwargs)


def test_the_objective_draws_with_a_cpu_generator_for_data_on_the_gpu():
    """``objective(model, x0_on_gpu, generator=cpu_generator)`` drew the noise with
    ``torch.randn(..., generator=cpu_generator, device='cuda')``, which raises on CUDA."""
    from zoo.diffusion.setup import build_objective

    objective = build_objective(zoo.load_recipe(RECIPE, []))
    x0 = torch.empty(4, 4, 8, 8, device="meta")  # stands in for the GPU
    with GeneratorDevices():
        out = objective(lambda x, t, y: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(0))
    assert out["loss"].shape == (4,) and out["loss"].device.type == "meta"


def test_fsdp_on_gpus_checks_each_gpu_for_its_share_of_the_weights(tmp_path, monkeypatch):
    """Each GPU of an FSDP run holds 1/N of the weights, gradients, AdamW state and EMA, but the memory
    check before the run counted them whole: a model too big for one GPU, the reason to use FSDP, was
    refused. Processes on one CPU share its memory, so there the check stays as it was."""
    import contextlib

    import pytest

    from zoo.errors import UserError
    from zoo.memory import estimate, require_memory

    with torch.device("meta"):
        model = zoo.build_model(zoo.load_recipe(RECIPE, []))
    whole = estimate(model)
    free = whole.fixed // 4 + whole.per_sample  # a quarter of the state and one sample's activations
    assert require_memory(model, "cuda", 1, available=free, shards=8).fixed == whole.fixed // 8
    with pytest.raises(UserError, match="this run needs about"):
        require_memory(model, "cuda", 1, available=free)

    seen = []

    def stop_here(*args, shards: int = 1, **kwargs):
        seen.append(shards)
        raise UserError("stop here")

    monkeypatch.setattr(loop, "require_training_memory", stop_here)
    monkeypatch.setattr(distributed, "init", lambda device: Context(rank=0, world=8, device=torch.device(device)))
    monkeypatch.setattr(distributed, "agreement", lambda ctx: contextlib.nullcontext())
    for parallel, device in [("fsdp", "cuda"), ("ddp", "cuda"), ("fsdp", "cpu")]:
        with pytest.raises(UserError, match="stop here"):
            Trainer(zoo.load_recipe(RECIPE, [*SMALL, f"train.parallel={parallel}"]), tmp_path, device=device, log=QUIET)
    assert seen == [8, 1, 1]


def test_free_gpu_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """mem_get_info is the driver's free memory: after a few training steps PyTorch's cache holds the freed
    activations, so the sample grid's memory check saw a nearly full GPU and every grid became a warning."""
    from zoo import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 20, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 << 30)
    assert memory.available_bytes(torch.device("cuda:0")) == (100 << 20) + (10 << 30)
