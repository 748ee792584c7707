"""DiMR against the official implementation: golden tiny models and the released key lists."""

import json
import re
from pathlib import Path

import pytest
import torch

import zoo
from zoo.convert import dimr as convert
from zoo.diffusion.multiscale import multiscale_loss, multiscale_targets
from zoo.parity import build_official_model, run_parity

GOLDEN = Path(__file__).parent / "golden"
RECIPES = Path(__file__).parents[1] / "recipes"
FILES = ["golden_dimr_tiny_r2.pt", "golden_dimr_tiny_r3.pt"]
# Float32 forward vs the float32 golden: measured 8.3e-7 here, the same under ZOO_SIN_ULP=±1 (these
# models take time through time-dependent parameters, not sinusoids) and with scalar kernels;
# 1e-5 leaves 12x for another CPU's accumulation order (the contract of zoo parity is 1e-4).
TOL = 1e-5
U32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module", params=FILES)
def golden(request):
    data = torch.load(GOLDEN / request.param, weights_only=True)
    model = build_official_model("dimr", data["config"], data["state_dict"])
    return data, model


def _max_err(actual, expected) -> float:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
    return max((a - e).abs().max().item() for a, e in zip(actual, expected))


@torch.no_grad()
def test_outputs_and_handed_on_features(golden):
    data, model = golden
    inputs = data["inputs"]
    outputs, features = model.forward_with_features(inputs["x"], inputs["log_snr"], inputs["y"])
    assert _max_err(outputs, data["outputs"]) <= TOL
    assert _max_err(features, data["lowres_skips"]) <= TOL
    assert [o.shape[-1] for o in outputs] == sorted(o.shape[-1] for o in outputs)  # lowest resolution first


@torch.no_grad()
def test_outputs_with_one_time_for_the_batch(golden):
    data, model = golden
    inputs = data["inputs_shared_t"]
    assert _max_err(model(inputs["x"], inputs["log_snr"], inputs["y"]), data["outputs_shared_t"]) <= TOL


@torch.no_grad()
def test_every_time_dependent_parameter(golden):
    """Each official TimeDependentParameter, found in the zoo model through the converter's key map."""
    data, model = golden
    tau = data["inputs"]["log_snr"] * 0.25
    for official, expected in data["tdp_values"].items():
        name = convert.zoo_key(f"{official}.param0", data["config"])[0].removesuffix(".p0")
        value = model.get_submodule(name)(tau)
        # p1 + sigmoid(a tau + b) (p0 - p1) in float32 with |p0|, |p1| <= 2: another CPU's exp may move
        # sigmoid by 4u relative (<= 16u after the product) and the product and sum round by 2u each
        # on either side (8u): 24u = 1.4e-6.
        torch.testing.assert_close(value, expected, rtol=0, atol=24 * U32 * 2, msg=f"{official} -> {name}")


def test_multiscale_targets_and_loss(golden):
    data, _ = golden
    example = data["loss_example"]
    targets = multiscale_targets(example["eps"], data["outputs"])
    # Average pooling (a sum of 4, then a scale): at most 4 roundings of values <= |target|, twice.
    scale = max(t.abs().max().item() for t in example["targets"])
    assert _max_err(targets, example["targets"]) <= 8 * U32 * scale
    # A float32 mean of 3*32*32*3 squares in another summation order: both within log2(9216) = 14
    # roundings (pairwise), 28u = 1.7e-6 of the loss (~2.5); rtol 1e-6 + atol 1e-6 allows 3.5e-6.
    per_sample = multiscale_loss(data["outputs"], example["eps"], example["loss_coeffs"])
    torch.testing.assert_close(per_sample, example["per_sample_loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_sample.mean(), example["loss"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FILES)
def test_parity_command_path(name):
    result = run_parity(GOLDEN / name)
    assert result.family == "dimr" and result.passed and result.max_abs <= TOL


def test_parity_fp64_says_when_the_file_has_no_fp64_outputs(capsys):
    """These files hold float32 outputs only: --fp64 compared with them and said nothing."""
    from zoo.cli import main

    assert run_parity(GOLDEN / FILES[0], dtype=torch.float64).reference == "outputs"
    assert main(["parity", str(GOLDEN / FILES[0]), "--fp64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"--fp64: {FILES[0]} holds no outputs_fp64; the float64 run was compared with its outputs "
                        "instead") and lines[2].startswith("max abs error")
    assert main(["parity", str(GOLDEN / FILES[0])]) == 0
    assert "outputs_fp64" not in capsys.readouterr().out


@pytest.mark.parametrize("name, params", [("dimr_xl_2r", 505_046_408), ("dimr_g_2r", 1_056_352_904)])
def test_released_checkpoint_keys_load_strictly(name, params):
    """The official key list converts into exactly the state dict of the zoo model built from the
    official config and of the one built from our recipe (meta device: keys and shapes)."""
    keys = json.loads((GOLDEN / "keys" / f"{name}.json").read_text())
    spec = convert.official_config_to_model_spec(keys["_config"])
    with torch.device("meta"):
        official = {k: torch.empty(shape) for k, shape in keys["keys"].items()}
        models = [zoo.build_model({"model": spec}), zoo.build_model(RECIPES / f"{name}.yaml")]
    converted = convert.convert_state_dict(official, keys["_config"])
    shapes = {k: tuple(v.shape) for k, v in converted.items()}
    assert sum(v.numel() for v in converted.values()) == keys["_num_params_total"] == params
    for model in models:
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
        model.load_state_dict(converted, strict=True, assign=True)


def test_unknown_keys_and_options_are_user_errors():
    data = torch.load(GOLDEN / FILES[0], weights_only=True)
    with pytest.raises(zoo.errors.UserError, match="unexpected key"):
        convert.convert_state_dict({"stages.0.mystery.weight": torch.zeros(1)}, data["config"])
    with pytest.raises(zoo.errors.UserError, match="dropout"):
        convert.official_config_to_model_spec(
            {**data["config"], "stage_configs": [{**data["config"]["stage_configs"][0], "dropout_prob": 0.1}]}
        )
    state = {k: v for k, v in data["state_dict"].items() if not k.endswith("block2.w1.weight")}
    with pytest.raises(zoo.errors.UserError, match="w0 and w1"):
        convert.convert_state_dict(state, data["config"])
    # damaged tensors were reshape/cat RuntimeErrors (a traceback, exit 1)
    pos = "stages.0.input_layer.3.position_embeddings.weight"
    for table in (data["state_dict"][pos][:60], data["state_dict"][pos].reshape(1, 8, 8, 32)):
        with pytest.raises(zoo.errors.UserError, match=r"has shape .* a square number of positions"):
            convert.convert_state_dict({**data["state_dict"], pos: table}, data["config"])
    w1 = "stages.0.blocks.0.block2.w1.weight"
    with pytest.raises(zoo.errors.UserError, match=r"w0 \(64, 32\) and w1 \(64, 30\) differ in shape"):
        convert.convert_state_dict({**data["state_dict"], w1: data["state_dict"][w1][:, :30]}, data["config"])
    with pytest.raises(zoo.errors.UserError, match="--config FILE"):  # zoo convert without --config
        convert.convert_state_dict(data["state_dict"], None)
    # MRModel builds LayerNorms where its config names no norm_type: said so, not read as TDRMSN (whose
    # keys then read as 'unexpected', questioning whether the file was official)
    with pytest.raises(zoo.errors.UserError, match=r"DiMR norm_type 'LN' is not supported; zoo converts \['TDRMSN'\]"):
        convert.official_config_to_model_spec({k: v for k, v in data["config"].items() if k != "norm_type"})


def test_zoo_convert_writes_a_checkpoint_that_reproduces_the_official_outputs(tmp_path):
    """``zoo convert dimr OFFICIAL.pt --recipe R.yaml --config CONFIG.json`` end to end."""
    import yaml

    from zoo.checkpoint import load_checkpoint
    from zoo.cli import main

    data = torch.load(GOLDEN / FILES[1], weights_only=True)
    torch.save(data["state_dict"], tmp_path / "official.pt")
    (tmp_path / "config.json").write_text(json.dumps(data["config"]))
    recipe = {"model": convert.official_config_to_model_spec(data["config"])}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    status = main(["convert", "dimr", str(tmp_path / "official.pt"), "--recipe", str(tmp_path / "tiny.yaml"),
                   "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "ckpt")])  # fmt: skip
    assert status == 0
    model, _ = load_checkpoint(tmp_path / "ckpt")
    inputs = data["inputs"]
    with torch.no_grad():
        outputs = model.eval()(inputs["x"], inputs["log_snr"], inputs["y"])
    assert _max_err(outputs, data["outputs"]) <= TOL


@pytest.mark.parametrize("golden", FILES)
def test_zoo_convert_without_config_reads_the_layout_from_the_recipe(tmp_path, golden, capsys):
    """The released DiMR checkpoints hold no config, and the key lists with one were not installed:
    the recipe of the same model gives each stage's block kind and depth, strict loading the rest."""
    import yaml

    from zoo.checkpoint import load_checkpoint
    from zoo.cli import main

    data = torch.load(GOLDEN / golden, weights_only=True)
    torch.save(data["state_dict"], tmp_path / "official.pt")
    recipe = {"model": convert.official_config_to_model_spec(data["config"])}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["convert", "dimr", str(tmp_path / "official.pt"), "--recipe", str(tmp_path / "tiny.yaml")]
    assert main([*argv, "--out", str(tmp_path / "ckpt")]) == 0
    assert "changed the recipe's model" not in capsys.readouterr().out
    # a shape-keeping --set without an official config is noted, as for DiT (the layout read from the
    # recipe holds block kinds and depths only: num_heads went unchecked and unsaid)
    assert main([*argv, "--out", str(tmp_path / "heads"), "--set", "model.branches.0.block.num_heads=1"]) == 0
    assert ("zoo convert: note: model.branches.0.block.num_heads changed the recipe's model; a setting that keeps "
            "every tensor's shape") in capsys.readouterr().out
    model, _ = load_checkpoint(tmp_path / "ckpt")
    inputs = data["inputs"]
    with torch.no_grad():
        outputs = model.eval()(inputs["x"], inputs["log_snr"], inputs["y"])
    assert _max_err(outputs, data["outputs"]) <= TOL
    shallow = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    shallow["model"]["branches"][0]["depth"] -= 2  # another model: its keys do not fit, said in one line
    (tmp_path / "shallow.yaml").write_text(yaml.safe_dump(shallow))
    capsys.readouterr()
    argv[-1] = str(tmp_path / "shallow.yaml")
    assert main([*argv, "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "other").exists()
    depth = shallow["model"]["branches"][0]["depth"]
    assert re.search(rf"is block \d+ of stage 0, which has {2 * (depth // 2) + 1} blocks for num_blocks {depth} "
                     r"\(branch 0's depth\) \(use the recipe \(or --config\)", err)


def test_zoo_convert_refuses_a_recipe_that_differs_from_the_official_config_in_one_line(tmp_path, capsys):
    """num_heads keeps every tensor's shape, so strict loading cannot see it: the config comparison does."""
    import yaml

    from zoo.cli import main

    data = torch.load(GOLDEN / FILES[1], weights_only=True)
    torch.save(data["state_dict"], tmp_path / "official.pt")
    (tmp_path / "config.json").write_text(json.dumps(data["config"]))
    recipe = {"model": convert.official_config_to_model_spec(data["config"])}
    heads = recipe["model"]["branches"][0]["block"]["num_heads"]
    recipe["model"]["branches"][0]["block"]["num_heads"] = heads * 2
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    argv = ["convert", "dimr", str(tmp_path / "official.pt"), "--recipe", str(tmp_path / "tiny.yaml"),
            "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "ckpt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key model.branches.0.block.num_heads" in err
    assert f"the recipe says {heads * 2}, the official config {heads}" in err and not (tmp_path / "ckpt").exists()
    # a setting the recipe leaves at the backbone's default is compared too: block_grad_to_lowres went unseen
    recipe["model"]["branches"][0]["block"]["num_heads"] = heads
    recipe["model"].pop("detach_handed", None)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "config.json").write_text(json.dumps({**data["config"], "block_grad_to_lowres": True}))
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith("key model.detach_handed: the recipe leaves model.detach_handed at its "
                                            "default False, the official config says True (--set "
                                            "model.detach_handed=true)\n")
    broken = {k: v for k, v in data["config"].items() if k != "channels"}
    (tmp_path / "config.json").write_text(json.dumps(broken))
    assert main(argv) == 2
    assert "lacks the key 'channels'" in capsys.readouterr().err
