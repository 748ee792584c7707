"""Pins for training-loop, pruning, validation-loss, DiMR-conversion and prepare-latents behaviours that a
round of mutation testing could change without any test failing (each test names what it pins)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.training import Trainer, train

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # a tiny class-conditional DiT on 8x8 pixels
QUIET = lambda *_: None  # noqa: E731
PLAIN = ["train.sample_every=0", "train.ckpt_every=0", "train.batch_size=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(*overrides):
    return zoo.load_recipe(RECIPE, [*PLAIN, *overrides])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- the training loop ----------------------------------------------------------------------------


def test_the_logged_learning_rate_follows_the_documented_warmup(tmp_path):
    """Update k (0 = the first) must run at lr * k / warmup_steps: an off-by-one gave it lr * (k + 1) / warmup."""
    records = train(_recipe("train.warmup_steps=4", "train.log_every=1", "train.lr=1e-3"), tmp_path, steps=6,
                    log=QUIET)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # the record of step s (1-based) holds the lr of update k = s - 1; the formula as docs/training.md writes it
    assert [r["lr"] for r in records] == [1e-3 * k / 4 for k in range(4)] + [1e-3, 1e-3]
    assert _log(tmp_path)[0]["lr"] == 0.0  # the first update at lr 0, in log.jsonl too


def test_a_fresh_run_whose_first_batch_cannot_be_read_saves_no_checkpoint(tmp_path, capsys):
    """A fresh run whose first batch failed to read saved last/ at step 0, making an untrained directory a run."""
    from PIL import Image

    broken = []
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            path = tmp_path / "img" / c / f"{i}.png"
            if (c, i) == ("a", 0):  # sample 0 is read when the run is set up: that one is whole
                Image.new("RGB", (12, 12), (200, 30, 60)).save(path)
            else:  # any batch of 4 of the 8 holds a damaged one
                path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
                broken.append(path)
    run = tmp_path / "run"
    code = main(["train", str(RECIPE), "--out", str(run), "--set", "data.dataset=image_folder",
                 "--set", f"data.root={tmp_path / 'img'}", "--set", "data.num_workers=0",
                 "--set", "train.batch_size=4", "--set", "train.sample_every=0", "--set", "train.ckpt_every=0",
                 "--set", "train.steps=3"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("zoo: error: cannot read image ") and err.count("\n") == 1, err
    assert any(err.startswith(f"zoo: error: cannot read image {path}: ") for path in broken), err
    assert "saving" not in out and "--resume" not in err  # nothing trained: nothing to go on from
    assert run.is_dir() and not (run / "last").exists() and not list(run.glob("step_*"))


def test_the_logged_grad_norm_is_the_mean_over_the_steps_that_were_not_skipped(tmp_path, monkeypatch):
    """The window's grad_norm divided the finite steps' sum by all its steps, skipped (fp16, inf) ones too."""
    real, norms, poisoned = Trainer.train_step, [], []

    def train_step(self, x, y, *args, **kwargs):
        if not poisoned:  # every gradient inf while the flag says so: the scaler skips that step
            for p in self.model.parameters():
                if p.requires_grad:
                    p.register_hook(lambda g: torch.full_like(g, float("inf")) if poisoned[0] else g)
            poisoned.append(False)
        poisoned[0] = self.step == 1  # the second step of the window
        loss = real(self, x, y, *args, **kwargs)
        norms.append(self.grad_norm.clone())
        return loss

    r = _recipe("train.precision=fp16", "train.log_every=4", "train.warmup_steps=0")
    monkeypatch.setattr(Trainer, "train_step", train_step)
    records = train(r, tmp_path, steps=4, log=QUIET)
    assert len(norms) == 4 and not torch.isfinite(norms[1]) and all(torch.isfinite(norms[i]) for i in (0, 2, 3))
    assert len(records) == 1 and records[0]["skipped_steps"] == 1
    expected = float(norms[0] + norms[2] + norms[3]) / 3
    # float32 norms summed in another order than the loop's: a few ulps (~1e-7 relative) apart; skipped
    # steps counted in would be 25% off
    assert records[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_a_stop_asked_during_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    """A stop asked for during the last step raised StopRequested for a run that had finished its steps."""
    import signal

    from zoo.training.signals import StopRequested

    real = Trainer.train_step

    def train_step(self, x, y, *args, **kwargs):
        if self.step == 2:  # the last of 3 steps: the request arrives while it trains
            self.stops.received = signal.SIGTERM
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        records = train(_recipe("train.log_every=1"), tmp_path, steps=3, log=QUIET)
    except StopRequested as stop:  # a KeyboardInterrupt: caught here, or it would end the whole pytest session
        pytest.fail(f"the finished run raised {stop!r}")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 3


def test_a_run_ending_on_a_grid_step_draws_the_final_grid_once(tmp_path, monkeypatch):
    """A run ending on a grid step (4 at sample_every 2) drew its final grid a second time after the loop."""
    calls = []
    monkeypatch.setattr(Trainer, "sample_grid", lambda self: calls.append(self.step))
    train(zoo.load_recipe(RECIPE, [*PLAIN, "train.sample_every=2", "train.log_every=0"]), tmp_path, steps=4,
          log=QUIET)
    assert calls == [2, 4]


def test_keep_last_2_in_one_run_keeps_the_two_newest_step_dirs(tmp_path):
    """Pruning returned one kept step too few, so keep_last 2 over 8 steps left step_0000004 unpruned."""
    r = _recipe("train.ckpt_every=2", "train.keep_last=2", "train.log_every=0")
    train(r, tmp_path, steps=8, log=QUIET)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000006", "step_0000008"]


# -- the validation loss --------------------------------------------------------------------------


def test_the_validation_loss_drops_no_label():
    """Label-drop uniforms of 0 dropped every held-out label (a fresh DiT's zeroed adaLN hid it): they are 1."""
    from torch.utils.data import TensorDataset

    from zoo.diffusion.setup import build_objective
    from zoo.training.data import synthetic_dataset
    from zoo.training.val_loss import ValLoss

    recipe = zoo.load_recipe(RECIPE, ["train.val_n=12", "data.size=6"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double().eval()
    with torch.no_grad():  # every weight non-zero, so the labels reach the output
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    data = synthetic_dataset((3, 8, 8), 6, 4, seed=0)
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    hook = ValLoss(recipe, recipe["train"], data, (3, 8, 8), build_objective(recipe), torch.device("cpu"))
    objective, seen = hook.objective, []

    def recording(model, x, y, draws):
        seen.append((y.clone(), draws[2].clone()))
        return objective(model, x, y, draws=draws)

    hook.objective = recording
    value = hook(model, step=1)["val_loss"]
    assert seen and all(torch.equal(keep, torch.ones(len(y))) for y, keep in seen)
    assert all(int(label) < 4 for y, _ in seen for label in y)  # the images' own classes, not the null label 4

    # the labels reach this model's loss: with the null label in their place it differs (float64 both ways)
    hook.objective = lambda m, x, y, draws: objective(m, x, torch.full_like(y, 4), draws=draws)
    assert abs(hook(model, step=1)["val_loss"] - value) > 1e-6 * value


# -- the DiMR converter ---------------------------------------------------------------------------


def _dimr_config(block="TransformerBlock", **stage):
    kind = {"num_attention_heads": 2} if block == "TransformerBlock" else {"kernel_size": 3}
    return {"channels": 3, "num_classes": 10, "norm_type": "TDRMSN", "block_grad_to_lowres": False,
            "stage_configs": [{"block_type": block, "dim": 32, "hidden_dim": 48, **kind, "num_blocks": 1,
                               "max_height": 4, "max_width": 4, "image_input_ratio": 1, "input_feature_ratio": 2,
                               **stage}]}


def test_a_dimr_stage_with_hidden_dim_one_and_a_half_dim_gets_mlp_ratio_1_5():
    """mlp_ratio is hidden_dim / dim: floor division made hidden_dim 48 over dim 32 a ratio of 1, not 1.5."""
    from zoo.convert.dimr import official_config_to_model_spec

    spec = official_config_to_model_spec(_dimr_config())
    assert spec["branches"][0]["block"]["mlp_ratio"] == 1.5
    assert official_config_to_model_spec(_dimr_config("ConvNeXtBlock"))["branches"][0]["block"]["mlp_ratio"] == 1.5
    assert official_config_to_model_spec(_dimr_config(hidden_dim=128))["branches"][0]["block"]["mlp_ratio"] == 4.0


def test_a_dimr_stage_without_final_kernel_size_gets_a_3x3_head():
    """A stage naming no final_kernel_size must get the converter's default head kernel 3, not another."""
    from zoo.convert.dimr import official_config_to_model_spec

    assert official_config_to_model_spec(_dimr_config())["branches"][0]["head_kernel_size"] == 3
    assert official_config_to_model_spec(_dimr_config(final_kernel_size=1))["branches"][0]["head_kernel_size"] == 1


# -- prepare-latents ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers VAE (16 px images -> 4x8x8 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return path


def test_a_renamed_first_image_of_shard_1_re_encodes_shard_1_alone(tmp_path, vae_dir):
    """Shard 0's digest also covered shard 1's first row: renaming that image re-encoded shard 0 too."""
    from PIL import Image

    from zoo.latents import prepare_latents, shard_name

    images, out = tmp_path / "images", tmp_path / "lat"
    g = torch.Generator().manual_seed(1)
    for c in ("n01", "n02"):
        (images / c).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(images / c / f"{c}_{i}.png")
    kw = dict(resolution=16, batch_size=4, shard_size=3, num_workers=0)
    assert prepare_latents(images, vae_dir, out, **kw)  # rows n01_0..3, n02_0..3: shards of 3, 3, 2
    stat = lambda k: (os.stat(out / shard_name(k)).st_ino, os.stat(out / shard_name(k)).st_mtime_ns)  # noqa: E731
    before = {k: stat(k) for k in range(3)}
    # row 3 (shard 1's first) under another name that sorts in the same place
    shutil.move(images / "n01" / "n01_3.png", images / "n01" / "n01_3b.png")
    lines = []
    assert prepare_latents(images, vae_dir, out, log=lines.append, **kw)
    assert "encoding 1 (3 images)" in lines[-1], lines
    assert [stat(k) == before[k] for k in range(3)] == [True, False, True]
