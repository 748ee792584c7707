"""``zoo convert dit``: official DiT-XL/2 key layout to a zoo checkpoint, strictly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.checkpoint import load_checkpoint
from zoo.cli import main
from zoo.convert import dit as convert_dit
from zoo.convert import unwrap_state_dict
from zoo.errors import UserError
from zoo.weights import load_state_dict_strict

KEYS = Path(__file__).parent / "golden" / "keys" / "dit_xl_2.json"
RECIPE = Path(zoo.__file__).resolve().parent.parent / "recipes" / "dit_xl_2.yaml"
DEPTH = 2  # the CLI tests keep XL width but only two blocks (cheap); the meta test covers all 28


def official_shapes(max_depth: int | None = None) -> dict[str, list[int]]:
    shapes = {k: v for k, v in json.loads(KEYS.read_text()).items() if not k.startswith("_")}
    if max_depth is not None:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < max_depth}
    return shapes


def test_full_xl_key_layout_converts_onto_the_recipe_model():
    """All 292 official XL/2 tensors map 1:1 onto the dit_xl_2 recipe model (on meta, no memory)."""
    official = {k: torch.empty(v, device="meta") for k, v in official_shapes().items()}
    assert len(official) == 292
    converted = convert_dit.convert_state_dict(official)
    with torch.device("meta"):
        model = zoo.build_model(RECIPE)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in official.values()) == 675_129_632


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=g) for k, v in official_shapes(DEPTH).items()}


def convert(tmp_path: Path, payload, name: str = "official.pt", *extra: str) -> tuple[int, Path]:
    src, out = tmp_path / name, tmp_path / "ckpt"
    torch.save(payload, src)
    argv = ["convert", "dit", str(src), "--recipe", str(RECIPE), "--set", f"model.depth={DEPTH}", "--out", str(out)]
    return main([*argv, *extra]), out


def test_convert_cli_round_trip(tmp_path, official_sd, capsys):
    # Official training checkpoints wrap the weights: {'model', 'ema', 'opt', 'args'}; EMA is taken.
    noise = {k: v + 1 for k, v in official_sd.items()}
    args = argparse.Namespace(model="DiT-XL/2", global_batch_size=256)
    status, out = convert(tmp_path, {"model": noise, "ema": official_sd, "opt": {}, "args": args})
    assert status == 0 and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, config = load_checkpoint(out)
    assert config["model"]["depth"] == DEPTH and config["model"]["hidden_size"] == 1152
    sd = model.state_dict()
    ada = official_sd["blocks.1.adaLN_modulation.1.weight"]
    assert torch.equal(sd["blocks.1.norm1.linear.weight"], ada[: 3 * 1152])
    assert torch.equal(sd["blocks.1.norm2.linear.weight"], ada[3 * 1152 :])
    assert torch.equal(sd["final_layer.norm.linear.bias"], official_sd["final_layer.adaLN_modulation.1.bias"])
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], official_sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["pos_embed"], official_sd["pos_embed"])
    # The checkpoint now in --out is replaced only with --force; --weights model takes the non-EMA weights.
    assert convert(tmp_path, {"model": noise, "ema": official_sd}, "train.pt", "--weights", "model")[0] == 2
    assert torch.equal(load_checkpoint(out)[0].state_dict()["pos_embed"], official_sd["pos_embed"])
    status, out = convert(tmp_path, {"model": noise, "ema": official_sd}, "train.pt", "--weights", "model", "--force")
    assert status == 0
    assert torch.equal(load_checkpoint(out)[0].state_dict()["pos_embed"], noise["pos_embed"])
    # Written inside that checkpoint, it made the checkpoint's next save (a resumed run's) fail
    argv = ["convert", "dit", str(tmp_path / "train.pt"), "--recipe", str(RECIPE), "--set", f"model.depth={DEPTH}"]
    assert main([*argv, "--out", str(out / "sub"), "--force"]) == 2
    assert f"--out {out / 'sub'} is inside the checkpoint directory {out}" in capsys.readouterr().err
    assert not (out / "sub").exists()
    # a zoo checkpoint's own weights file: no 'unexpected key' list, but what it is
    assert main(["convert", "dit", str(out / "model.safetensors"), "--recipe", str(RECIPE), "--out",
                 str(tmp_path / "again")]) == 2
    assert f"is a weights file of the zoo checkpoint {out}, already in zoo's layout" in capsys.readouterr().err


def test_a_safetensors_state_dict_converts_and_a_cut_one_is_said_so(tmp_path, official_sd, capsys):
    """A .safetensors file converted only because torch 2.14's torch.load reads one by its name; a cut one
    read 'it is not a torch file (unreadable pickle data)'."""
    from safetensors.torch import save_file

    src = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in official_sd.items()}, str(src))
    argv = ["convert", "dit", str(src), "--recipe", str(RECIPE), "--set", f"model.depth={DEPTH}"]
    assert main([*argv, "--out", str(tmp_path / "ckpt")]) == 0
    assert torch.equal(load_checkpoint(tmp_path / "ckpt")[0].state_dict()["pos_embed"], official_sd["pos_embed"])
    src.write_bytes(src.read_bytes()[:3000])
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read weights file {src}: not a complete safetensors file" in err and "torch file" not in err


def test_a_safetensors_file_named_pt_converts_and_a_folder_names_the_files_in_it(tmp_path, official_sd, capsys):
    """A safetensors file named .pt read 'not a torch file'; U-ViT's checkpoint folder (300000.ckpt/ holding
    nnet.pth and nnet_ema.pth) read 'it is a directory, not a file' with no file to pass instead."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in official_sd.items()}, str(tmp_path / "weights.pt"))
    argv = ["--recipe", str(RECIPE), "--set", f"model.depth={DEPTH}"]
    assert main(["convert", "dit", str(tmp_path / "weights.pt"), *argv, "--out", str(tmp_path / "ckpt")]) == 0
    assert torch.equal(load_checkpoint(tmp_path / "ckpt")[0].state_dict()["pos_embed"], official_sd["pos_embed"])
    folder = tmp_path / "300000.ckpt"
    folder.mkdir()
    for name in ("nnet.pth", "nnet_ema.pth", "optimizer.pth"):
        (folder / name).write_bytes(b"x")
    assert main(["convert", "dit", str(folder), *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a weights file; it holds nnet_ema.pth, nnet.pth, optimizer.pth" in err
    assert f"pass {folder / 'nnet_ema.pth'}" in err
    assert main(["sample", str(folder), "--out", str(tmp_path / "g.png")]) == 2  # it said only "no config.json"
    assert capsys.readouterr().err.endswith("is not a zoo checkpoint (no config.json) (it holds weights files: "
                                            "convert official weights with zoo convert first)\n")
    dit_folder = tmp_path / "checkpoints"  # DiT's training folder: the newest checkpoint (it named the oldest)
    dit_folder.mkdir()
    for name in ("0050000.pt", "0400000.pt", "0100000.pt"):
        (dit_folder / name).write_bytes(b"x")
    assert main(["convert", "dit", str(dit_folder), *argv, "--out", str(tmp_path / "o")]) == 2
    assert f"it holds 0400000.pt, 0100000.pt, 0050000.pt (pass {dit_folder / '0400000.pt'})" in capsys.readouterr().err
    (dit_folder / "².pt").write_bytes(b"x")  # a digit int() cannot read: it was a ValueError traceback
    assert main(["convert", "dit", str(dit_folder), *argv, "--out", str(tmp_path / "o")]) == 2
    assert f"(pass {dit_folder / '0400000.pt'})" in capsys.readouterr().err
    args = argparse.Namespace(data_path=Path("/data/imagenet/train"), model="DiT-XL/2")  # a Path in the args: data
    torch.save({"ema": official_sd, "args": args}, tmp_path / "train.pt")  # (it was refused as a pickled object)
    assert main(["convert", "dit", str(tmp_path / "train.pt"), *argv, "--out", str(tmp_path / "p")]) == 0
    torch.save(official_sd, tmp_path / "torch.safetensors")  # a torch file named .safetensors is read as one
    assert main(["convert", "dit", str(tmp_path / "torch.safetensors"), *argv, "--out", str(tmp_path / "t")]) == 0
    assert torch.equal(load_checkpoint(tmp_path / "t")[0].state_dict()["pos_embed"], official_sd["pos_embed"])
    # a zoo checkpoint folder, or a run directory: named as such (its weights file, which it had suggested, is
    # refused as already in zoo's layout)
    for given in (tmp_path / "ckpt", tmp_path / "run"):
        if given.name == "run":
            (given / "last").parent.mkdir()
            (tmp_path / "ckpt").rename(given / "last")
        assert main(["convert", "dit", str(given), *argv, "--out", str(tmp_path / "o")]) == 2
        kind = "checkpoint" if given.name == "ckpt" else "run directory"
        assert f"{given} is a zoo {kind}, already in zoo's layout (pass {given} to zoo sample" in capsys.readouterr().err
    assert main(["convert", "dit", str(tmp_path / "weights.pt"), *argv, "--config", str(folder),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"official config {folder} is a directory (pass the official config's JSON file)" in capsys.readouterr().err


def test_an_empty_ema_entry_is_not_silently_replaced_by_the_raw_weights():
    """{'ema': {}, 'model': sd} converted the raw weights with exit 0, where the default promises the EMA."""
    state = {"w": torch.zeros(2)}
    with pytest.raises(UserError, match=r"x.pt has an empty 'ema' entry \(pass --weights raw"):
        unwrap_state_dict({"ema": {}, "model": state}, "x.pt")
    assert unwrap_state_dict({"ema": {}, "model": state}, "x.pt", prefer="model") == state


def test_corrupt_key_is_a_clear_error(tmp_path, official_sd, capsys):
    bad = dict(official_sd)
    bad["blocks.0.attn.qkvv.weight"] = bad.pop("blocks.0.attn.qkv.weight")
    status, out = convert(tmp_path, bad)
    err = capsys.readouterr().err
    assert status == 2 and "blocks.0.attn.qkvv.weight" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nan", "complex", "int"])
def test_weights_no_model_can_use_are_refused(tmp_path, official_sd, capsys, kind):
    """NaN weights converted and then sampled black images with exit 0; complex and integer ones were cast."""
    bad = dict(official_sd)
    w = bad["blocks.0.attn.qkv.weight"]
    bad["blocks.0.attn.qkv.weight"] = {"nan": w * float("nan"), "complex": w.to(torch.complex64), "int": w.long()}[kind]
    status, out = convert(tmp_path, bad)
    err = capsys.readouterr().err
    assert status == 2 and "tensor blocks.0.attn.qkv.weight" in err and not out.exists()


def test_a_null_label_the_model_cannot_embed_is_refused_before_writing(tmp_path, official_sd, capsys):
    """It converted, and then every guided sample was refused (DiT-XL/2 embeds labels 0..1000)."""
    status, out = convert(tmp_path, official_sd, "official.pt", "--set", "diffusion.null_label=1001")
    assert status == 2 and "null_label is 1001, but the model embeds labels 0..1000" in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_misshaped_keys_are_listed(tmp_path, official_sd, capsys):
    bad = dict(official_sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.0.mlp.fc1.bias"] = torch.zeros(1152)  # (a pos_embed of another length names the input size)
    status, _ = convert(tmp_path, bad)
    err = capsys.readouterr().err
    assert status == 2 and "missing keys: blocks.1.mlp.fc2.bias" in err
    assert "blocks.0.mlp.fc1.bias (1152,) (model: (4608,))" in err


def test_a_dit_of_another_patch_or_width_is_named_with_its_recipe(tmp_path, official_sd, capsys):
    """DiT-S/4 weights under dit_s_2 were said to be a DiT "for model.input_size 16 (8x8 patches of 2, 128px)",
    the recipe's patch taken for the checkpoint's: that fix failed again on the patch embedding's shape."""
    src = tmp_path / "official.pt"
    torch.save(official_sd, src)
    argv = ["convert", "dit", str(src), "--recipe", "dit_xl_4", "--set", f"model.depth={DEPTH}",
            "--out", str(tmp_path / "ckpt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: key model: the checkpoint is a DiT of hidden_size 1152, depth 2, patch_size 2 "
                          "for model.input_size 32 (16x16 patches of 2, 256px images); the recipe builds hidden_size "
                          "1152, depth 2, patch_size 4"), err
    assert convert_dit._shipped_dit(384, 12, 4, 32) == "dit_s_4"  # the shipped recipe of the checkpoint's model
    assert convert_dit._shipped_dit(1152, 28, 2, 64) == "dit_xl_2_512"
    assert convert_dit._shipped_dit(1152, 2, 2, 32) is None


def test_unreadable_and_empty_inputs(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["convert", "dit", str(tmp_path / "junk.pt"), "--recipe", str(RECIPE), "--out", str(tmp_path / "o")]) == 2
    assert main(["convert", "dit", str(tmp_path / "nope.pt"), "--recipe", str(RECIPE), "--out", str(tmp_path / "o")]) == 2
    assert main(["convert", "vit", str(tmp_path / "junk.pt"), "--recipe", str(RECIPE), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "does not exist" in err and "unknown model family 'vit'" in err
    with pytest.raises(UserError, match="holds no state dict"):
        unwrap_state_dict({"args": 1, "opt": {}}, "x.pt")


def test_official_config_maps_one_to_one():
    config = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4,
                  mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=7, learn_sigma=False)  # fmt: skip
    spec = convert_dit.official_config_to_model_spec(config)
    assert spec == {"type": "dit", **config}
    model = zoo.build_model({"model": spec})
    assert model.y_embedder.embedding_table.num_embeddings == 7 and model.final_layer.linear.out_features == 48
    with pytest.raises(UserError, match="unknown DiT config keys"):
        convert_dit.official_config_to_model_spec({**config, "use_checkpoint": True})


def test_a_fractional_mlp_ratio_truncates_the_width_as_the_official_constructors_do():
    """DiT and U-ViT build int(width · mlp_ratio) features: 384 · 2.7 = 1036.8 gives 1036. zoo rounded to
    1037, so an official checkpoint with that ratio failed to convert (fc1 (1036, 384) vs (1037, 384))."""
    from zoo.blocks.mlp import mlp_width

    assert mlp_width(384, 2.7) == 1036 and mlp_width(8, 2.7) == 21 and mlp_width(1152, 4.0) == 4608
    assert mlp_width(768, 2048 / 768) == 2048 and mlp_width(49, 1 / 49 * 49) == 49  # hidden/dim ratios stay exact
    dit = zoo.build_model({"model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4,
                                     "hidden_size": 384, "depth": 1, "num_heads": 6, "mlp_ratio": 2.7}})
    uvit = zoo.build_model({"model": {"type": "uvit", "img_size": 8, "patch_size": 2, "in_chans": 3,
                                      "embed_dim": 384, "depth": 1, "num_heads": 6, "mlp_ratio": 2.7}})
    assert dit.blocks[0].mlp.fc1.weight.shape == uvit.blocks.mid_block.mlp.fc1.weight.shape == (1036, 384)


def test_strict_loader_message_lists_everything():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(UserError, match=r"missing keys: bias; unexpected keys: b; wrong shape keys: weight \(2, 2\)"):
        load_state_dict_strict(model, {"weight": torch.zeros(2, 2), "b": torch.zeros(3)})


def test_a_recipe_of_another_family_is_named_as_such(tmp_path, official_sd, capsys):
    """It listed every official key as missing from the U-ViT; the family mismatch is the one line to read."""
    src, out = tmp_path / "official.pt", tmp_path / "ckpt"
    torch.save(official_sd, src)
    status = main(["convert", "dit", str(src), "--recipe", str(RECIPE.parent / "uvit_m_4.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and not out.exists()
    assert f"{src} is converted as dit, but the recipe builds a uvit model" in err


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_a_ddp_or_compiled_models_key_prefix_is_dropped(tmp_path, official_sd, prefix):
    """A DDP (or torch.compile) training script's state dict was 'unexpected key module.pos_embed'."""
    wrapped = {prefix + k: v for k, v in official_sd.items()}
    status, out = convert(tmp_path, {"ema": wrapped, "opt": {}})
    assert status == 0
    assert torch.equal(load_checkpoint(out)[0].state_dict()["pos_embed"], official_sd["pos_embed"])
    assert list(unwrap_state_dict({"module.a": torch.zeros(1), "b": torch.zeros(1)})) == ["module.a", "b"]  # not all


@pytest.mark.parametrize("dtype, how", [(torch.float16, "exactly"), (torch.float64, "rounded")])
def test_weights_of_another_precision_are_said_to_be_cast(tmp_path, official_sd, capsys, dtype, how):
    status, out = convert(tmp_path, {k: v.to(dtype) for k, v in official_sd.items()})
    assert status == 0 and load_checkpoint(out)[0].state_dict()["pos_embed"].dtype == torch.float32
    name = str(dtype).removeprefix("torch.")
    printed = capsys.readouterr().out
    assert f"the official tensors are {name}; the checkpoint holds them as the model's float32 ({how})" in printed
    assert "note: model.depth changed the recipe's model; a setting that keeps every tensor's shape" in printed


def test_weights_of_another_family_name_the_family_to_convert_as(tmp_path, capsys):
    """A U-ViT file converted as dit: 'unexpected key patch_embed.proj.weight', naming no fix."""
    uvit = {k: torch.zeros(v) for k, v in json.loads((KEYS.parent / "uvit_m_4.json").read_text()).items()
            if not k.startswith("_")}
    status, out = convert(tmp_path, uvit, "nnet_ema.pth")
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and not out.exists()
    assert f"{tmp_path / 'nnet_ema.pth'} holds uvit weights, not dit ones (zoo convert uvit " in err


def test_a_recipe_zoo_build_refuses_is_refused_before_writing(tmp_path, capsys):
    """It converted (exit 0) a checkpoint whose data.num_classes made diffusion.null_label a real label,
    which zoo sample and zoo export then refused."""
    golden = torch.load(Path(__file__).parent / "golden" / "golden_dit_tiny.pt", weights_only=True)
    src, out = tmp_path / "official.pt", tmp_path / "ckpt"
    torch.save(golden["state_dict"], src)
    tiny = ["--set", "model.input_size=16", "--set", "model.hidden_size=64", "--set", "model.depth=2", "--set",
            "model.num_heads=2", "--set", "model.num_classes=10", "--set", "diffusion.null_label=10"]
    status = main(["convert", "dit", str(src), "--recipe", "dit_s_2", *tiny, "--out", str(out)])
    assert status == 2 and not out.exists()
    assert "data.num_classes is 1000, but the model has 10 classes (labels 0..9; its label row 10 is the null " \
        "label)" in capsys.readouterr().err
    assert main(["convert", "dit", str(src), "--recipe", "dit_s_2", *tiny, "--set", "data.num_classes=10",
                 "--out", str(out)]) == 0
