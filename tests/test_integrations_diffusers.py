"""zoo backbones as diffusers models: time map, save/load, DiTPipeline against zoo sampling, zoo export."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import zoo  # noqa: E402
from zoo.checkpoint import save_checkpoint  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.errors import UserError  # noqa: E402
from zoo.integrations.diffusers import ZooTransformer2DModel, to_diffusers  # noqa: E402
from zoo.sample import SampleRequest, sample_latents
from zoo.seeds import sample_seed

STEPS = 9  # 999 = 9·111: diffusers' "linspace" timesteps 999, 888, ..., 111 are exactly zoo's time-uniform grid
SOLVER = {"type": "dpm_solver++", "steps": STEPS, "order": 2, "method": "multistep", "skip": "time_uniform"}
SAMPLE = {"solver": SOLVER, "cfg": {"scale": 2.0, "convention": "dit"}}  # DiTPipeline guides every ε channel
DIT = {  # 10 classes, null label 10: DiTPipeline's null label 1000 must become 10
    "model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2,
              "num_heads": 2, "class_dropout_prob": 0.1, "num_classes": 10, "learn_sigma": True},
    "diffusion": {"schedule": {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
                  "time_input": "dit_index", "label_drop": 0.1, "null_label": 10},
    "data": {"num_classes": 10},
    "sample": SAMPLE,
}
_BLOCK = {"mlp_ratio": 2.0, "norm": "td_rmsnorm", "mlp": "geglu_mlp"}
DIMR = {
    "model": {"type": "dimr", "in_channels": 4, "input_size": 8, "num_classes": 11, "norm": "td_layernorm", "branches": [
        {"dim": 16, "depth": 1, "patch_size": 2, "block": {"type": "transformer", "num_heads": 2, "qkv_bias": False, **_BLOCK}},
        {"dim": 8, "depth": 1, "patch_size": 1, "block": {"type": "convnext", "kernel_size": 3, **_BLOCK}}]},
    "diffusion": {"schedule": {"type": "scaled_linear", "num_steps": 1000, "beta_start": 0.00085, "beta_end": 0.012},
                  "time_input": "dimr_log_snr", "label_drop": 0.1, "null_label": 10},
    "data": {"num_classes": 10},
    "sample": SAMPLE,
}
DIMR_V = {**DIMR, "diffusion": {**DIMR["diffusion"], "prediction": "v"}}  # the emoji32 recipes' prediction
RECIPES = {"dit": DIT, "dimr": DIMR, "dimr_v": DIMR_V}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(recipe: dict) -> torch.nn.Module:
    """A tiny model with every weight moved off its init (adaLN-Zero's zeros, TD params' p0 = p1)."""
    torch.manual_seed(0)
    model = zoo.build_model(recipe).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _tiny_vae() -> AutoencoderKL:
    """A random 4-channel AutoencoderKL with one block (no downsampling): built offline, decodes 8x8 latents."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8).eval()


@pytest.mark.parametrize("family", ["dit", "dimr"])
def test_forward_maps_ddpm_steps_to_the_backbones_time_input(family):
    model = _model(RECIPES[family]).double()
    wrapper = to_diffusers(model, RECIPES[family])
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    k = torch.tensor([0, 500, 999])
    out = wrapper(x, k, torch.tensor([1, 1000, 9])).sample
    y = torch.tensor([1, 10, 9])  # DiTPipeline's null label 1000 is this model's 10
    if family == "dit":
        assert torch.equal(out, model(x, k, y))  # DiT takes the 0-based DDPM index itself
    else:  # DiMR: log_snr = 8n/1000 - 4 with the 1-based step n = k + 1; the last branch is the prediction
        expected = model(x, 8.0 * (k + 1).double() / 1000 - 4, y)[-1]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)  # float64: (k+1)/N·N is k+1 to a few ulps
    assert wrapper.config.out_channels == (8 if family == "dit" else 4)  # learned sigma: [eps | v]


def test_save_pretrained_round_trip_is_json_and_strict(tmp_path):
    wrapper = to_diffusers(_model(DIMR), DIMR)
    wrapper.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["_class_name"] == "ZooTransformer2DModel" and config["model"] == DIMR["model"]
    assert (config["sample_size"], config["in_channels"], config["out_channels"]) == (8, 4, 4)
    loaded = ZooTransformer2DModel.from_pretrained(tmp_path / "hf")
    x, k, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([3, 1000])
    assert torch.equal(loaded(x, k, y).sample, wrapper(x, k, y).sample)
    weights = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "backbone.branches.1.upsample.proj.bias"}, weights)
    with pytest.raises(UserError, match="missing keys: backbone.branches.1.upsample.proj.bias"):
        ZooTransformer2DModel.from_pretrained(tmp_path / "hf")  # diffusers alone would init it randomly
    save_file({**state, "backbone.extra": torch.zeros(1)}, weights)
    with pytest.raises(UserError, match="unexpected keys: backbone.extra"):
        ZooTransformer2DModel.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("family", ["dit", "dimr", "dimr_v"])
def test_dit_pipeline_gives_zoo_samples(family):
    """DiTPipeline + DPMSolverMultistepScheduler (DPM-Solver++(2M), 9 steps to ᾱ_0) = zoo's dpm_solver++ sampler.

    For a v-predicting model the scheduler make_scheduler builds is told so (it sampled v as ε).

    Same x_T (the pipeline draws sample i from zoo's per-sample seed), same labels, same CFG.
    Tolerance: diffusers computes its scheduler in float32; the largest rounding is σ at the last
    knot, sqrt((1 − ᾱ_0)/ᾱ_0) from float32 ᾱ_0 = 1 − β_0: 8.3e-5 relative for DiT's β_0 = 1e-4
    (1.3e-5 for DiMR's 8.5e-4). It enters the final first-order step weighted by σ_0/σ_111 = 0.026
    (0.079) on x − x̂0 (≤ 2·max|x|): ≤ 4.4e-6 (2.1e-6) of max|x|. The other knots' σ are rounded far
    less, float32 arithmetic adds ~1e-7 a step; we allow 1e-5·max|x| (measured here: 4e-7·max|x|).
    """
    recipe, model, vae = RECIPES[family], _model(RECIPES[family]), _tiny_vae()
    n, seed = 3, 7
    ref, labels = sample_latents(model, recipe, SampleRequest(n=n, seed=seed))
    transformer = to_diffusers(model, recipe)
    scheduler = transformer.make_scheduler(DPMSolverMultistepScheduler, solver_order=2, algorithm_type="dpmsolver++",
                                           final_sigmas_type="sigma_min", timestep_spacing="linspace")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    decoded_from, decode = [], vae.decode
    vae.decode = lambda z, *a, **kw: decoded_from.append(z.clone()) or decode(z, *a, **kw)
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
    images = pipe(class_labels=labels.tolist(), guidance_scale=2.0, generator=generators,
                  num_inference_steps=STEPS, output_type="pt").images
    latents = decoded_from[0] * vae.config.scaling_factor  # the pipeline decodes latents / scaling_factor
    scale = ref.abs().max()
    assert scale > 1.0  # a real sample, not zeros
    torch.testing.assert_close(latents, ref, rtol=0, atol=1e-5 * scale.item())
    with torch.no_grad():
        ours = (decode(ref / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ours, rtol=0, atol=1e-4)  # the same decoder on latents 1e-5-close


def test_export_cli_writes_the_diffusers_layout_atomically(tmp_path):
    model = _model(DIT)
    ema = {k: v + 0.5 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", model, zoo.load_recipe(DIT), ema=ema)
    out = tmp_path / "hf"
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "zoo_export.json"]
    loaded = ZooTransformer2DModel.from_pretrained(out)
    assert all(torch.equal(v, ema[k]) for k, v in loaded.backbone.state_dict().items())  # EMA weights by default
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out)]) == 2  # no silent replace
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out), "--weights", "model", "--force"]) == 0
    loaded = ZooTransformer2DModel.from_pretrained(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.backbone.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary directories left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(tmp_path / "mine"), "--force"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (out / "NOTES.md").write_text("mine")  # an export a user added a file to: --force deleted it with the export
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out), "--force"]) == 2
    assert (out / "NOTES.md").read_text() == "mine" and (out / "diffusion_pytorch_model.safetensors").is_file()


def test_an_export_a_kill_interrupted_is_repaired_by_loading_and_by_the_next_export(tmp_path, capsys, monkeypatch):
    """Killed between its renames only hf.old-*/hf.tmp-* are there: from_pretrained found no config.json, and a
    rerun was refused before anything removed the copies a kill left."""
    import shutil

    save_checkpoint(tmp_path / "ckpt", _model(DIT), zoo.load_recipe(DIT))
    out = tmp_path / "hf"
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    shutil.copytree(out, tmp_path / "hf.tmp-0123abcd")  # the new copy, sealed
    out.rename(tmp_path / "hf.old-4567cdef")  # the old one set aside; the kill came before the install
    ZooTransformer2DModel.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    (tmp_path / "hf.tmp-89abcdef").mkdir()  # a kill while filling: unsealed, a weights copy's worth of disk
    (tmp_path / "hf.tmp-89abcdef" / "config.json").write_text("{}")
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    (tmp_path / "afile.txt").write_text("keep")  # under a file: a FileExistsError traceback
    assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(tmp_path / "afile.txt" / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'afile.txt'} is a file, not a directory" in err, err
    monkeypatch.setenv("HOME", str(tmp_path))  # bash leaves `--out=~/hf2` as it is: it went to ./~/hf2
    monkeypatch.chdir(tmp_path)
    assert main(["export", "diffusers", "~/ckpt", "--out=~/hf2"]) == 0
    assert (tmp_path / "hf2" / "zoo_export.json").is_file() and not (tmp_path / "~").exists()


def test_to_diffusers_of_a_module_needs_its_recipe():
    with pytest.raises(UserError, match="recipe"):
        to_diffusers(_model(DIT))


def test_to_diffusers_of_a_module_built_from_another_recipe_says_which_recipe_to_pass():
    """Before: "the zoo model does not match the model; missing keys: ..." (which two models?)."""
    model = _model(DIT)
    other = {**DIT, "model": {**DIT["model"], "depth": 1}}
    with pytest.raises(UserError, match=r"the model given to to_diffusers does not match the model its recipe builds; "
                                        r"unexpected keys: blocks.1.* \(pass the recipe it was built from"):
        to_diffusers(model, recipe=other)


class _PluginNet(torch.nn.Module):
    """A `_target_` backbone as docs/integrations.md describes one: example_inputs on the current device."""

    def __init__(self, channels: int = 4, size: int = 8):
        super().__init__()
        self.size, self.channels = size, channels
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    def example_inputs(self, batch):
        return torch.randn(batch, self.channels, self.size, self.size, device="cpu"), torch.rand(batch), None


class _ItemNet(_PluginNet):
    def forward(self, x, t, y=None):
        assert x.abs().max().item() < 1e6  # needs real values: cannot run on meta
        return super().forward(x, t, y)


@pytest.mark.parametrize("cls", [_PluginNet, _ItemNet])
def test_a_target_backbone_exports_to_diffusers(cls):
    """to_diffusers (and zoo export diffusers) ran a meta model on the plugin's cpu inputs: a torch traceback;
    a forward that needs real values crashed the same way. The export works, and the wrapper's output is the
    backbone's."""
    recipe = {"model": {"_target_": f"{__name__}.{cls.__name__}"},
              "diffusion": {"schedule": DIT["diffusion"]["schedule"], "time_input": "dit_index"}}
    model = zoo.build_model(recipe).eval()
    wrapper = to_diffusers(model, recipe)
    assert wrapper.config.sample_size == 8 and wrapper.config.in_channels == wrapper.config.out_channels == 4
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x, torch.tensor([999, 0])).sample, model(x, torch.tensor([999, 0])),
                                   rtol=0, atol=0)


def test_the_wrapper_pickles():
    """Its time map was a lambda: pickle.dumps and torch.save of the wrapper raised, where diffusers' own
    models and zoo's backbones pickle."""
    import pickle

    wrapper = to_diffusers(_model(DIMR), DIMR)
    again = pickle.loads(pickle.dumps(wrapper))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    with torch.no_grad():
        assert torch.equal(again(x, t, class_labels=torch.tensor([1, 2])).sample,
                           wrapper(x, t, class_labels=torch.tensor([1, 2])).sample)


def test_an_export_names_the_plugin_it_needs_when_that_plugin_is_gone(tmp_path):
    """The export recorded no plugin: loaded without it, the folder said '<recipe dict>: key model.block.type:
    unknown block ...' with no install hint, where the zoo checkpoint names the plugin and its version."""
    import sys
    from pathlib import Path

    from fake_plugins import on_sys_path

    recipe = {**DIT, "model": {**DIT["model"], "block": "plug_block"}}
    with on_sys_path(Path(__file__).parent / "fake_plugins" / "dit_block"):
        try:
            save_checkpoint(tmp_path / "ckpt", _model(recipe), zoo.load_recipe(recipe))
            assert main(["export", "diffusers", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
            loaded = ZooTransformer2DModel.from_pretrained(tmp_path / "hf")
            assert type(loaded.backbone.blocks[0]).__name__ == "PlugBlock"
        finally:
            sys.modules.pop("zoo_dit_block_plugin", None)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["plugins"] == {"zoo-dit-block-plugin": "0.3"}
    with pytest.raises(UserError) as info:
        ZooTransformer2DModel.from_pretrained(tmp_path / "hf")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'hf' / 'config.json'}: key model.block") and "unknown block 'plug_block'" in message
    assert message.endswith("(it was written with the plugin zoo-dit-block-plugin==0.3 installed: "
                            "pip install zoo-dit-block-plugin==0.3)")


def test_a_folder_exported_before_plugins_were_recorded_still_loads(tmp_path):
    model = _model(DIT)
    to_diffusers(model, recipe=DIT).save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config.pop("plugins") == {}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = ZooTransformer2DModel.from_pretrained(tmp_path / "old")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.backbone.state_dict().items())
