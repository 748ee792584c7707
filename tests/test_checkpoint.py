"""Checkpoint directories: round trip, atomic replace, strict loading, tied tensors, trainer state."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from zoo import checkpoint as ckpt
from zoo.errors import UserError

RECIPE = {
    "model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
              "depth": 2, "num_heads": 2, "num_classes": 10},
    "train": {"steps": 10, "batch_size": 2, "lr": 1e-4, "ckpt_every": 0, "sample_every": 0, "log_every": 0},
}  # fmt: skip


def _model() -> nn.Module:
    import zoo

    model = zoo.build_model(RECIPE)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)  # non-zero everywhere, so a lost tensor shows
    return model


def test_round_trip_with_ema_and_trainer_state(tmp_path):
    model, ema = _model(), _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(*model.example_inputs(2)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "history": [1.0, 0.5]}
    out = ckpt.save_checkpoint(tmp_path / "run" / "last", model, RECIPE, ema=ema, state=state)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors", "trainer_state.pt"]
    payload = json.loads((out / "config.json").read_text())
    assert payload["recipe"] == RECIPE and payload["versions"]["torch"] == torch.__version__ and "zoo" in payload["versions"]

    loaded, config = ckpt.load_checkpoint(out)
    assert config == RECIPE
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    loaded_ema, _ = ckpt.load_checkpoint(out, weights="ema")
    assert torch.equal(loaded_ema.blocks[1].attn.qkv.weight, ema.blocks[1].attn.qkv.weight)

    restored = ckpt.load_trainer_state(out)  # weights_only=True inside
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])
    opt2 = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-4)
    opt2.load_state_dict(restored["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_incomplete_ema_is_an_error(tmp_path):
    model = _model()
    ema = {k: v for k, v in model.state_dict().items() if k != "blocks.0.mlp.fc1.bias"}
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, ema=ema)
    with pytest.raises(UserError, match=r"ema.safetensors does not match the model; missing keys: blocks.0.mlp.fc1.bias"):
        ckpt.load_checkpoint(tmp_path / "c", weights="ema")
    with pytest.raises(UserError, match="weights must be"):
        ckpt.load_checkpoint(tmp_path / "c", weights="best")


def test_replace_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "last"
    ckpt.save_checkpoint(target, model, RECIPE, state={"step": 1})
    ckpt.save_checkpoint(target, model, RECIPE, state={"step": 2})
    assert ckpt.load_trainer_state(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(target, model, RECIPE, state={"step": 3})
    assert ckpt.load_trainer_state(target)["step"] == 2  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_trainer_state_must_be_plain(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state\['args'\] is a Namespace"):
        ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE, state={"step": 1, "args": argparse.Namespace(lr=1)})
    assert not (tmp_path / "c").exists()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied weights: one tensor, two names
        self.t = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous
        self.register_buffer("part", torch.arange(12.0)[2:8])  # a view into a larger storage


def test_tied_and_non_contiguous_tensors(tmp_path):
    src, dst = Tied(), Tied()
    ckpt.save_weights(tmp_path / "w.safetensors", src.state_dict())
    state = ckpt.load_weights(tmp_path / "w.safetensors")
    ckpt.load_state_dict_strict(dst, state)
    assert torch.equal(dst.emb.weight, src.emb.weight) and dst.head.weight is dst.emb.weight
    assert torch.equal(dst.t, src.t) and torch.equal(dst.part, src.part)


def test_strict_loading_names_the_problem(tmp_path):
    model = _model()
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE)
    other = dict(RECIPE, model=dict(RECIPE["model"], depth=3))
    (tmp_path / "c" / "config.json").write_text(json.dumps({"format": ckpt.FORMAT, "versions": {}, "recipe": other}))
    with pytest.raises(UserError, match=r"missing keys: blocks\.2\.norm1\.linear\.weight"):
        ckpt.load_checkpoint(tmp_path / "c")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a zoo checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        ckpt.read_config(tmp_path)
    with pytest.raises(UserError, match="no trainer state"):
        ckpt.load_trainer_state(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_weights(tmp_path / "model.safetensors")
