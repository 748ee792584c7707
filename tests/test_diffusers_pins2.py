"""Pins on zoo.integrations.diffusers that no other test held: an unconditional backbone ignores the labels
DiTPipeline always passes, a null label of 0 is a label, explicit scheduler arguments win, a mismatched
weight is an error even where diffusers is told to ignore it, EMA weights are the Python API's default, and
an empty directory is a valid export target. Tiny float64 models; no downloads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file  # noqa: E402

import zoo  # noqa: E402
from zoo.checkpoint import save_checkpoint  # noqa: E402
from zoo.errors import UserError  # noqa: E402
from zoo.integrations.diffusers import ZooTransformer2DModel, export, to_diffusers  # noqa: E402
from test_integrations_diffusers import _model  # noqa: E402  # a tiny model moved off its zero init

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
UNCOND = {  # a U-ViT with no label table: labels given to it are an error
    "model": {"type": "uvit", "img_size": 8, "patch_size": 2, "in_chans": 4, "embed_dim": 16, "depth": 1,
              "num_heads": 2, "num_classes": -1},
    "diffusion": {"schedule": SCHEDULE, "time_input": "dit_index"},
}
DIT_MODEL = {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 16, "depth": 1,
             "num_heads": 2, "num_classes": 10, "class_dropout_prob": 0.1, "learn_sigma": False}


def _checkpoint(tmp_path) -> tuple[torch.nn.Module, dict]:
    """A checkpoint of the unconditional U-ViT whose EMA weights differ from its model weights."""
    model = _model(UNCOND)
    ema = {k: v + 0.5 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", model, zoo.load_recipe(UNCOND), ema=ema)
    return model, ema


def test_an_unconditional_backbone_ignores_the_labels_dit_pipeline_passes():
    """DiTPipeline always passes class_labels (1000 for the unconditional half): a wrapper that forwarded them
    to a backbone without a label table (or that recorded every model as class-conditional) raised."""
    model = _model(UNCOND).double()
    wrapper = to_diffusers(model, UNCOND)
    assert wrapper.config.class_conditional is False
    x, k = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 900])
    out = wrapper(x, k, torch.tensor([1000, 7])).sample
    assert torch.equal(out, model(x, k))


def test_a_null_label_of_zero_replaces_the_pipelines_1000():
    """null_label is −1 for none; 0 is a label: a wrapper that read 0 as 'no null label' could not drop labels
    (DiTPipeline's 1000) and raised instead of running the unconditional pass on label 0."""
    torch.manual_seed(0)
    wrapper = ZooTransformer2DModel(model=DIT_MODEL, time_input="dit_index", schedule=SCHEDULE, null_label=0,
                                    class_conditional=True, sample_size=8).double().eval()
    x, k = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([5, 700])
    out = wrapper(x, k, torch.tensor([1000, 3])).sample
    assert torch.equal(out, wrapper.backbone(x, k, torch.tensor([0, 3])))


def test_make_scheduler_lets_an_explicit_argument_win():
    """Keyword arguments go to the scheduler as given, prediction_type included: a wrapper that put its own
    prediction_type after them silently overrode the caller's."""
    from diffusers import DDIMScheduler

    wrapper = to_diffusers(_model(UNCOND), UNCOND)
    assert wrapper.make_scheduler(DDIMScheduler).config.prediction_type == "epsilon"
    scheduler = wrapper.make_scheduler(DDIMScheduler, prediction_type="sample", beta_end=0.03)
    assert scheduler.config.prediction_type == "sample" and scheduler.config.beta_end == 0.03


def test_a_mismatched_weight_is_an_error_even_when_diffusers_is_told_to_ignore_it(tmp_path):
    """from_pretrained(ignore_mismatched_sizes=True) leaves a wrong-shaped tensor randomly initialised with only a
    log line; zoo's strict loading must refuse it like a missing or unexpected key."""
    to_diffusers(_model(UNCOND), UNCOND).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(k for k, v in state.items() if v.ndim == 2)
    save_file({**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}, weights)
    with pytest.raises(UserError, match=f"does not match its config: mismatched keys: .*{key}"):
        ZooTransformer2DModel.from_pretrained(tmp_path / "hf", ignore_mismatched_sizes=True, low_cpu_mem_usage=False)


def test_to_diffusers_of_a_checkpoint_takes_its_ema_weights_by_default(tmp_path):
    """EMA first, as zoo sample and timm do: a default of use_ema=False exported the raw training weights."""
    model, ema = _checkpoint(tmp_path)
    wrapper = to_diffusers(tmp_path / "ckpt")
    assert all(torch.equal(v, ema[k]) for k, v in wrapper.backbone.state_dict().items())
    raw = to_diffusers(tmp_path / "ckpt", use_ema=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.backbone.state_dict().items())


def test_export_takes_ema_weights_by_default_and_an_empty_directory(tmp_path):
    """export() in Python defaults to the EMA weights (as the CLI's --weights does), and an existing empty
    directory is a new target, not 'not a zoo diffusers export'."""
    import json

    _, ema = _checkpoint(tmp_path)
    (tmp_path / "hf").mkdir()
    export(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "zoo_export.json").read_text())["weights"] == "ema"
    loaded = ZooTransformer2DModel.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(v, ema[k]) for k, v in loaded.backbone.state_dict().items())
