"""Pins on the torchrun launch check that a sixth round of mutation testing could change unseen: one process
per GPU is the normal launch (torchrun --nproc_per_node equal to the node's GPU count), only more processes
than GPUs are refused. CUDA device counts are monkeypatched: no GPU needed."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError
from zoo.training.distributed import check_gpus_per_node, check_launch


def _torchrun(monkeypatch, gpus: int, per_node: int, world: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for key, value in {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": per_node, "RANK": 0, "LOCAL_RANK": 0}.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_as_many_processes_as_gpus_on_a_node_is_accepted(monkeypatch, gpus):
    """--nproc_per_node 8 on an 8-GPU node is how every multi-GPU run starts: a >= test refused it."""
    _torchrun(monkeypatch, gpus=gpus, per_node=gpus, world=2 * gpus)
    check_gpus_per_node(torch.device("cuda"))
    check_launch(torch.device("cuda"))
    _torchrun(monkeypatch, gpus=gpus, per_node=max(1, gpus - 1), world=2 * gpus)
    check_launch(torch.device("cuda"))


def test_more_processes_than_gpus_on_a_node_is_refused(monkeypatch):
    """The ranks past the last GPU would fail with a CUDA error while the others wait: one line instead."""
    _torchrun(monkeypatch, gpus=2, per_node=3, world=3)
    with pytest.raises(UserError, match=r"torchrun --nproc_per_node 3: this node has 2 CUDA GPUs.*"
                                        r"use --nproc_per_node 2 \(or fewer\), or --device cpu"):
        check_launch(torch.device("cuda"))
    check_launch(torch.device("cpu"))  # gloo on the CPU: no GPU count applies
