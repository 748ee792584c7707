"""Pins on the safe reading of an FSDP run's shard index (zoo.training.fsdp_checkpoint) that the FSDP tests
did not hold: the unpickler admits torch's dtypes but no other torch global, and an index naming a shard
file zoo does not write is refused before DCP opens it. One process, no process group."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from zoo.errors import UserError
from zoo.training.fsdp_checkpoint import INDEX, _MetadataUnpickler, shard_reader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_index_unpickler_admits_torch_dtypes_but_no_other_torch_global():
    """torch.float32 is part of an index; torch.load is not: admitting every `torch.X` would let a checkpoint
    reach torch.load (a full unpickler) or torch.save from a resume."""
    assert _MetadataUnpickler(io.BytesIO(pickle.dumps(torch.float32))).load() is torch.float32
    for name in ("load", "save"):
        with pytest.raises(pickle.UnpicklingError, match=f"torch.{name} is not part of a checkpoint index"):
            _MetadataUnpickler(io.BytesIO(f"ctorch\n{name}\n.".encode())).load()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_shard_index_naming_a_file_zoo_does_not_write_is_refused(tmp_path):
    """The index's storage entries name the shard files DCP opens: one outside zoo's __R_N.distcp names
    (another directory's file, say) is refused when the index is read, not followed."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path)
    shard_reader(tmp_path).read_metadata()  # as written: accepted
    meta = pickle.loads((tmp_path / INDEX).read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../elsewhere.bin"
    (tmp_path / INDEX).write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError, match=r"files zoo does not write \(\.\./elsewhere\.bin\)"):
        shard_reader(tmp_path).read_metadata()


def test_optimizer_state_without_parameter_names_is_refused_saying_to_resume_with_ddp():
    """A consolidated optimizer state whose groups do not name their parameters cannot be keyed by name for
    FSDP: one UserError suggesting ddp; without the check a KeyError (or state under the wrong names)."""
    from zoo.training.fsdp_checkpoint import optimizer_state_by_name

    state = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0, 1], "lr": 1e-3}]}
    with pytest.raises(UserError, match="does not name its parameters") as err:
        optimizer_state_by_name(state)
    assert "ddp" in err.value.suggestion
    named = {**state, "param_groups": [{"params": [0, 1], "names": ["a.weight", "a.bias"], "lr": 1e-3}]}
    out = optimizer_state_by_name(named)
    assert list(out["state"]) == ["a.weight"] and out["param_groups"][0]["params"] == ["a.weight", "a.bias"]
