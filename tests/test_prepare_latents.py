"""zoo prepare-latents on a tiny random diffusers VAE and generated PNGs; the latents dataset that
reads its output; the one-line errors of the paper recipes without data."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from zoo.cli import main
from zoo.errors import UserError
from zoo.latents import MANIFEST, PLAN, load_encoder, prepare_latents, shard_name
from zoo.training.crop import adm_center_crop, to_tensor
from zoo.training.data import build_dataset

RES = 16
LATENT_RECIPE = str(Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml")  # not the current directory's


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path))
    return path


def _vae_4x(path: Path) -> Path:
    """A tiny random AutoencoderKL with 4x downsampling (the fixture's is 2x) saved at ``path``: a VAE that
    does not fit the fixture's latents."""
    from diffusers import AutoencoderKL

    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  block_out_channels=[4, 4, 4], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=RES).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Two classes, ten images of several shapes (landscape, portrait, large enough to be box-halved)."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(1)
    sizes = [(40, 24), (20, 33), (64, 70), (16, 16), (50, 17)]
    for c in ("n02", "n01"):
        (root / c).mkdir()
        for i, (w, h) in enumerate(sizes):
            pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{c}_{i}.JPEG" if i % 2 else root / c / f"{c}_{i}.png")
    return root


def test_adm_center_crop_box_halves_then_bicubic_and_centres():
    # A 1-pixel 0/255 checkerboard: BOX halving averages each 2x2 cell to 127.5 -> uniform grey
    # (a plain bicubic resize would alias); the result is size x size.
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255).to(torch.uint8)
    out = adm_center_crop(Image.fromarray(board.numpy()).convert("RGB"), 16)
    assert out.size == (16, 16)
    assert to_tensor(out).unique().tolist() == to_tensor(Image.new("RGB", (1, 1), (128,) * 3)).unique().tolist()
    # A 2:1 image, left half black, right half white: the centre crop keeps 8 black, 8 white columns.
    half = torch.zeros(32, 64, dtype=torch.uint8)
    half[:, 32:] = 255
    cols = to_tensor(adm_center_crop(Image.fromarray(half.numpy()).convert("RGB"), 16))[0, 0]
    assert (cols[:7] == -1).all() and (cols[9:] == 1).all()


def _adm_reference(image, size):
    """guided-diffusion's center_crop_arr as written there: BOX-halve, bicubic-resize the whole image, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("wh, size", [((9, 499), 32), ((499, 9), 32), ((21, 787), 16), ((300, 40), 16), ((64, 64), 16)])
def test_adm_center_crop_is_adms_pixel_for_pixel_thin_images_included(wh, size):
    """Noise is the hard case: a 9x499 strip at 32 came out up to 17 levels off when zoo resampled
    only the centre square of anything past 8:1 (PIL orders its two passes by the output size)."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert np.array_equal(np.asarray(adm_center_crop(image, size)), np.asarray(_adm_reference(image, size)))


def test_a_huge_strip_is_cropped_without_resizing_all_of_it(monkeypatch):
    """ADM resizes the whole image first: 1x20000 at 256 would be a 4 GB image. Past the pixel budget
    only the centre square is resampled; for a smooth strip that is the full resize's crop within 1 level."""
    import numpy as np

    import zoo.training.crop as crop

    monkeypatch.setattr(crop, "MAX_RESIZED_PIXELS", 16 * 16 * 8)  # a 2x3000 strip at 16 (16x24000) is past it
    ramp = np.linspace(0, 255, 3000)[:, None, None] * np.ones((1, 2, 3))
    strip = Image.fromarray(ramp.astype(np.uint8))  # 2 wide, 3000 tall
    full = _adm_reference(strip, 16)
    asked = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: asked.append(size) or resize(self, size, *a, **k))
    out = adm_center_crop(strip, 16)
    assert out.size == (16, 16) and max(max(s) for s in asked) == 16
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(full, dtype=int)).max() <= 1


def test_prepare_latents_shards_manifest_and_moments(tmp_path, vae_dir, image_dir, capsys):
    out = tmp_path / "lat"
    args = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--batch-size", "3", "--shard-size", "4", "--workers", "0"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [  # first the file read of the --vae folder: which of several it took is seen
        f"zoo prepare-latents: VAE weights {(vae_dir / 'diffusion_pytorch_model.safetensors').resolve()}",
        f"zoo prepare-latents: 10 images in 2 classes under {image_dir}; 3 shards of up to 4 in {out}, "
        f"encoding 3 (10 images) on cpu"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["num_images"] == 10 and manifest["classes"] == ["n01", "n02"]
    assert [s["num_images"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["resolution"] == RES
    assert manifest["vae"]["scaling_factor"] == pytest.approx(0.18215) and len(manifest["vae"]["sha256"]) == 64
    shard = load_file(str(out / shard_name(1)))
    assert shard["mean"].shape == shard["std"].shape == (4, 2, 4, 8, 8)
    assert shard["labels"].tolist() == [0, 1, 1, 1]  # images 4..7: the last n01 and the first three n02

    # Image 5 (n02_0.png) recomputed by hand: crop, encode, and the flip is the flipped image's encoding.
    vae, _ = load_encoder(vae_dir)
    with Image.open(image_dir / "n02" / "n02_0.png") as im:
        x = to_tensor(adm_center_crop(im.convert("RGB"), RES))[None]
    with torch.no_grad():
        posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    # float32 convolutions of a batch of 3 vs 2 may sum in another order: ~1e-7 relative, values O(1)
    torch.testing.assert_close(shard["mean"][1], posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shard["std"][1], posterior.std, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shard["mean"][1, 0], shard["mean"][1, 1])  # the two views differ

    # Resume: a lost shard (and manifest) is re-encoded; whole shards are not touched.
    kept = {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)}
    (out / shard_name(1)).unlink()
    (out / MANIFEST).unlink()
    assert main(args) == 0
    assert "encoding 1 (4 images) on cpu" in capsys.readouterr().out
    assert {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)} == kept
    torch.testing.assert_close(load_file(str(out / shard_name(1)))["mean"], shard["mean"], atol=1e-5, rtol=1e-5)
    assert (out / MANIFEST).is_file()

    # Other settings into the same directory: refused, nothing written.
    assert main(args[:-6] + ["--resolution", "8", "--shard-size", "4", "--workers", "0"]) == 2
    assert "(resolution, latent_shape differ)" in capsys.readouterr().err


def test_ranks_split_the_shards_and_the_last_one_writes_the_manifest(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=3, num_workers=0)
    assert prepare_latents(image_dir, vae_dir, out, rank=1, world=2, **kw) is False
    assert sorted(p.name for p in out.glob("shard_*")) == [shard_name(1), shard_name(3)]
    assert not (out / MANIFEST).exists() and (out / PLAN).is_file()
    with pytest.raises(Exception, match="unfinished zoo prepare-latents"):
        build_dataset({"dataset": "latents", "root": str(out)}, (4, 8, 8), 2)
    assert prepare_latents(image_dir, vae_dir, out, rank=0, world=2, **kw) is True
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 4


def test_an_image_size_other_than_the_latents_resolution_is_refused(tmp_path, vae_dir, image_dir):
    """`--set data.image_size=512` beside latents made at 256 trained on them without a word (the latent shapes
    match a model of the same latent size): the recipe then says one thing and trains on another."""
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    for data in ({"dataset": "imagenet", "latent": True, "root": str(out), "vae_scale": 0.18215},
                 {"dataset": "latents", "root": str(out)}):  # the same manifest, the same check
        assert len(build_dataset({**data, "image_size": RES}, (4, 8, 8), 2)) == 10
        with pytest.raises(UserError, match=f"data.image_size is {2 * RES}, but the latents in .* were made from "
                           f"{RES}x{RES} images") as err:
            build_dataset({**data, "image_size": 2 * RES}, (4, 8, 8), 2)
        assert err.value.key_path == "data.image_size" and f"set data.image_size to {RES}" in err.value.suggestion


def test_latent_dataset_draws_from_the_posterior_of_a_random_view(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    ds = build_dataset({"dataset": "imagenet", "latent": True, "root": str(out), "vae_scale": 0.18215}, (4, 8, 8), 2)
    assert len(ds) == 10 and ds.labels.tolist() == [0] * 5 + [1] * 5
    mean, std = ds.moments(7)
    torch.manual_seed(3)
    z, y = ds[7]
    torch.manual_seed(3)
    view = int(torch.randint(2, ()))
    expected = 0.18215 * (mean[view] + std[view] * torch.randn(4, 8, 8))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    assert y == 1
    views = set()
    for seed in range(16):
        torch.manual_seed(seed)
        z, _ = ds[7]
        views.add(min(range(2), key=lambda v: (z / 0.18215 - mean[v]).abs().mean().item()))
    assert views == {0, 1}  # both the image and its flip are drawn
    with pytest.raises(Exception, match="vae_scale"):
        build_dataset({"dataset": "latents", "root": str(out), "vae_scale": 0.13025}, (4, 8, 8), 2)


def test_latent_draws_are_keyed_by_the_global_sample_not_the_process(tmp_path, vae_dir, image_dir):
    """Two ranks (or a resumed run) see the latents one process sees: each item's view and ε come
    from a generator keyed by (seed, global sample position), not from torch's global RNG."""
    from zoo.training.data import EpochSampler, batches

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    ds = build_dataset({"dataset": "latents", "root": str(out), "vae_scale": 0.18215}, (4, 8, 8), 2)
    def stream(n, **kw):
        it = iter(EpochSampler(10, 4, seed=5, keyed=True, **kw))
        return [next(it) for _ in range(n)]

    one = stream(24)  # 6 global batches of 4, over 3 epochs of 2 batches
    assert len({key for _, key in one}) == 24  # every global sample its own key
    ranks = [stream(12, rank=r, world=2) for r in (0, 1)]
    merged = [pair for step in range(6) for r in (0, 1) for pair in ranks[r][2 * step: 2 * step + 2]]
    assert merged == one  # rank r holds its half of every global batch, with the same keys
    assert stream(8, start_step=1) == one[4:12]  # resuming at step 1 continues the stream

    torch.manual_seed(0)
    a = torch.cat([next(batches(ds, 4, seed=5, rank=r, world=2))[0] for r in (0, 1)])
    torch.manual_seed(1)  # the global RNG no longer matters
    b = next(batches(ds, 4, seed=5))[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_random_flip_false_draws_the_images_own_encoding_only(tmp_path, vae_dir, image_dir):
    """data.random_flip: false was ignored on prepared latents: about half the draws (49 of 120) were the
    flipped image's encoding, for data that must not be mirrored (the emoji recipes' reason for false)."""
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    spec = {"dataset": "latents", "root": str(out), "vae_scale": 0.18215}
    plain, flipping = (build_dataset({**spec, "random_flip": flip}, (4, 8, 8), 2) for flip in (False, True))
    views = []
    for key in range(24):
        index = key % len(plain)
        gen = torch.Generator().manual_seed(key)
        view = int(torch.randint(2, (), generator=gen))
        noise = torch.randn(plain.moments(index)[0].shape[1:], generator=gen)
        mean, std = plain.moments(index)
        for ds, used in ((plain, 0), (flipping, view)):
            expected = (mean[used] + std[used] * noise) * 0.18215
            torch.testing.assert_close(ds[(index, key)][0], expected, rtol=0, atol=0)
        views.append(view)
    assert 0 < sum(views) < len(views)  # the flipping dataset did take both views


def test_latents_of_another_size_name_the_resolution_for_the_vae_that_made_them(tmp_path, vae_dir, image_dir):
    """The hint assumed SD's f8 VAE ('--resolution 128' for 16x16 latents) whatever VAE the manifest records:
    with this f2 VAE, 128 gives 64x64 latents; 32 gives 16x16."""
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    with pytest.raises(UserError) as err:  # (the dataset is checked against the model as it is built)
        build_dataset({"dataset": "latents", "root": str(out), "vae_scale": 0.18215, "latent": True}, (4, 16, 16), 2)
    assert err.value.suggestion == ("set the model's input size to 8 (model.input_size, or model.img_size for U-ViT), "
                                    "or prepare latents of 16x16: zoo prepare-latents --resolution 32 with this f2 VAE "
                                    "and train with data.image_size 32")


@pytest.fixture(scope="module")
def lat64(tmp_path_factory, image_dir):
    """``zoo prepare-latents --resolution 64`` with a tiny f8 VAE (SD's downsampling): 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8] * 4, layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=64)
    vae8 = tmp_path_factory.mktemp("vae8")
    vae.save_pretrained(str(vae8))
    out = tmp_path_factory.mktemp("lat64") / "lat"
    prepare_latents(image_dir, vae8, out, resolution=64, num_workers=0)
    return out


EMOJI = Path(__file__).parents[1] / "recipes" / "emoji32"
TINY_RUN = ["--steps", "1", "--device", "cpu", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
            "--set", "train.val_every=0", "--set", "train.ckpt_every=0"]


def _train(recipe: Path | str, out: Path, sets: list[str]) -> int:
    return main(["train", str(recipe), "--out", str(out), *TINY_RUN, *[a for kv in sets for a in ("--set", kv)]])


@pytest.mark.parametrize("recipe, tiny, channels", [
    ("dit.yaml", ["model.hidden_size=16", "model.depth=1", "model.input_size=8"], "model.in_channels=4"),
    ("uvit.yaml", ["model.embed_dim=16", "model.depth=1", "model.img_size=8"], "model.in_chans=4")])
def test_latents_of_other_channels_than_the_model_name_its_in_channels(tmp_path, lat64, capsys, recipe, tiny,
                                                                          channels):
    """A pixel recipe on 4-channel latents of its size was told to prepare latents with the --resolution
    they were made at; the channel count is the mistake, and the fix that trains."""
    sets = [*tiny, "data.dataset=latents", f"data.root={lat64}", "data.image_size=64"]
    assert _train(EMOJI / recipe, tmp_path / "bad", sets) == 2
    err = capsys.readouterr().err
    assert "gives samples of shape (4, 8, 8), the model takes (3, 8, 8) (the latents have 4 channels: set " \
           "model.in_channels to 4 (model.in_chans for U-ViT))" in err and "--resolution" not in err, err
    assert _train(EMOJI / recipe, tmp_path / "run", [*sets, channels]) == 0, capsys.readouterr().err


def test_an_image_size_the_latents_were_not_made_at_is_told_the_model_size_too(tmp_path, lat64, capsys):
    """Latents made at 64 beside data.image_size 128 and a model of 16x16 latents were told 'set
    data.image_size to 64': the model's input size is its own setting, so the next run failed on
    (4, 8, 8) against (4, 16, 16). The message names both, and each fix it gives trains."""
    recipe = str(Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml")
    sets = ["data.dataset=latents", f"data.root={lat64}", "data.num_classes=2", "model.input_size=16",
            "data.image_size=128"]
    assert _train(recipe, tmp_path / "bad", sets) == 2
    err = capsys.readouterr().err
    assert ("(set data.image_size to 64 and the model's input size to 8 (model.input_size, or model.img_size for "
            "U-ViT), or prepare latents of 16x16: zoo prepare-latents --resolution 128 with this f8 VAE)") in err, err
    assert _train(recipe, tmp_path / "run", [*sets, "data.image_size=64", "model.input_size=8"]) == 0
    # data.image_size alone: the model's size is the one left, or latents of its size
    assert _train(recipe, tmp_path / "half", [*sets, "data.image_size=64"]) == 2
    assert ("the model takes (4, 16, 16) (set the model's input size to 8 (model.input_size, or model.img_size for "
            "U-ViT), or prepare latents of 16x16: zoo prepare-latents --resolution 128 with this f8 VAE and train "
            "with data.image_size 128)") in capsys.readouterr().err


def test_an_image_size_other_than_the_latents_resolution_for_a_model_of_their_size_is_told_only_that(lat64):
    """Latents made at 64 (8x8), a model of 8x8 latents and data.image_size 128: data.image_size 64 is the
    whole fix; preparing latents again at --resolution 64 (the ones already there) is not offered."""
    with pytest.raises(UserError, match="data.image_size is 128") as err:
        build_dataset({"dataset": "latents", "root": str(lat64), "image_size": 128}, (4, 8, 8), 2)
    assert err.value.suggestion == "set data.image_size to 64"


def test_a_pixel_recipe_on_latents_is_told_the_channels_then_the_sizes(tmp_path, lat64, capsys):
    """emoji32's DiT (3x32x32 pixels) on 4x8x8 latents was told 'prepare latents with --resolution 32'
    (4x4 latents for this VAE, still 4 channels): the channels are named first, then both sizes."""
    sets = ["model.hidden_size=16", "model.depth=1", "data.dataset=latents", f"data.root={lat64}"]
    assert _train(EMOJI / "dit.yaml", tmp_path / "bad", sets) == 2
    err = capsys.readouterr().err
    assert "set model.in_channels to 4" in err and "--resolution 32" not in err, err
    sets.append("model.in_channels=4")
    assert _train(EMOJI / "dit.yaml", tmp_path / "bad2", sets) == 2
    assert ("data.image_size is 32, but the latents in" in (err := capsys.readouterr().err) and "(set data.image_size "
            "to 64 and the model's input size to 8 (model.input_size, or model.img_size for U-ViT), or prepare latents "
            "of 32x32: zoo prepare-latents --resolution 256 with this f8 VAE and train with data.image_size 256)") in err
    assert _train(EMOJI / "dit.yaml", tmp_path / "run", [*sets, "data.image_size=64", "model.input_size=8"]) == 0


@pytest.mark.slow
def test_a_latent_recipe_trains_from_prepared_latents_and_samples_through_its_vae(tmp_path, vae_dir, image_dir, capsys):
    import shutil

    vae_copy = tmp_path / "vae"
    shutil.copytree(vae_dir, vae_copy)
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_copy, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    sets = ["--set", "data.dataset=latents", "--set", f"data.root={out}", "--set", "data.num_classes=2",
            "--set", f"data.image_size={RES}", "--set", "train.batch_size=4",
            "--set", "train.sample_every=2", "--set", "train.ckpt_every=0", "--set", "train.log_every=1"]
    capsys.readouterr()
    # No data.vae: the grids decode through the VAE the manifest says the latents were made with
    assert main(["train", LATENT_RECIPE, "--out", str(tmp_path / "run"), "--steps", "3",
                 "--device", "cpu", *sets]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert "draws no sample grids" not in capsys.readouterr().out
    # That VAE gone and none in the recipe: said once among the first lines, with the fix zoo train takes
    # (it said 'pass --vae', which zoo train refuses, at every grid)
    shutil.rmtree(vae_copy)
    assert main(["train", LATENT_RECIPE, "--out", str(tmp_path / "run1"), "--steps", "2",
                 "--device", "cpu", *sets]) == 0
    out_lines = capsys.readouterr().out.splitlines()
    warned = [i for i, line in enumerate(out_lines) if "this run draws no sample grids" in line]
    assert len(warned) == 1 and warned[0] < 8 and "--set data.vae=DIR" in out_lines[warned[0]]
    assert not (tmp_path / "run1" / "samples").exists()
    assert main(["train", LATENT_RECIPE, "--out", str(tmp_path / "run2"), "--steps", "2",
                 "--device", "cpu", *sets, "--set", f"data.vae={vae_dir}"]) == 0
    assert (tmp_path / "run2" / "samples" / "step_0000002.png").is_file()
    # The run samples through the same VAE, built from its own config (2x down here, not SD's 8x).
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--vae", str(vae_dir), "--solver", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert f"wrote 2 images ({RES}x{RES})" in capsys.readouterr().out


def test_zoo_trains_vae_advice_names_data_vae_not_the_vae_flag(tmp_path, vae_dir, image_dir, capsys):
    """A data.vae that does not fit the latents (or a folder of several weight files) under zoo train was
    answered '(--set data.vae=DIR, or --vae)' / '(or --vae)': zoo train refuses --vae."""
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, num_workers=0)
    other = _vae_4x(tmp_path / "vae4x")
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.pth", "b.pth"):
        (several / name).write_bytes(b"")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {{type: dit, input_size: 8, patch_size: 2, in_channels: 4, hidden_size: 16, depth: 1,
         num_heads: 2, num_classes: 2, class_dropout_prob: 0.1, learn_sigma: false}}
diffusion: {{time_input: dit_index, label_drop: 0.1, null_label: 2}}
data: {{dataset: latents, root: {out}, num_classes: 2}}
train: {{steps: 1, batch_size: 4, log_every: 1, sample_every: 1, sample_n: 4, ckpt_every: 0}}
sample: {{solver: {{type: ddim, steps: 2}}}}
""")
    made_with = vae_dir / "diffusion_pytorch_model.safetensors"
    for i, (vae, advice) in enumerate(((other, f"(decode with that VAE: --set data.vae={made_with})"),
                                       (several, f"(give the file itself: --set data.vae={several / 'a.pth'})"))):
        capsys.readouterr()
        assert main(["train", str(recipe), "--out", str(tmp_path / f"run{i}"), "--device", "cpu",
                     "--set", f"data.vae={vae}"]) == 0
        warning = next(line for line in capsys.readouterr().out.splitlines() if "draws no sample grids" in line)
        assert warning.endswith(advice) and "--vae" not in warning


def test_zoo_train_says_once_at_its_start_that_data_vae_holds_another_networks_weights(tmp_path, capsys):
    """data.vae naming a zoo checkpoint (its ema.safetensors is the file found) passed the start-up check,
    which only found the file; every grid then warned '(the VAE: --vae, or data.vae in a recipe) does not
    match the model', naming a flag zoo train refuses. Its keys are checked at the start: one warning."""
    from safetensors.torch import save_file

    (tmp_path / "ckpt").mkdir()
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt" / "ema.safetensors"))
    assert main(["train", LATENT_RECIPE, "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "2",
                 "--set", "train.batch_size=2", "--set", f"data.vae={tmp_path / 'ckpt'}",
                 "--set", "train.sample_every=1", "--set", "train.sample_n=2", "--set", "data.image_size=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    warned = [line for line in lines if "no sample grid" in line]
    assert len(warned) == 1 and warned[0].startswith(
        f"zoo train: warning: this run draws no sample grids: {tmp_path / 'ckpt' / 'ema.safetensors'} "
        "(the VAE: data.vae) does not match the model; missing keys: encoder.conv_in.weight")
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert lines.index(warned[0]) < first_step  # at the start, before any step, not at a grid
    assert not (tmp_path / "run" / "samples").exists()
    # a .pth has no header to check: read at the grid, its message names data.vae too
    (tmp_path / "pth").mkdir()
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "pth" / "other.pth")
    assert main(["train", LATENT_RECIPE, "--out", str(tmp_path / "run2"), "--device", "cpu", "--steps", "1",
                 "--set", "train.batch_size=2", "--set", f"data.vae={tmp_path / 'pth'}",
                 "--set", "train.sample_every=1", "--set", "train.sample_n=2", "--set", "data.image_size=8"]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "no sample grid" in line]
    assert len(warned) == 1 and "other.pth (the VAE: data.vae) does not match the model" in warned[0]


def test_the_latents_dataset_makes_a_latent_model_without_data_latent(tmp_path, vae_dir, image_dir, capsys):
    """dataset: latents without latent: true trained on latents, then drew its grids and zoo sample output
    as undecoded 4-channel tiles (and refused --vae: 'this model samples pixels'): the dataset decides."""
    from PIL import Image

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, num_workers=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {{type: dit, input_size: 8, patch_size: 2, in_channels: 4, hidden_size: 16, depth: 1,
         num_heads: 2, num_classes: 2, class_dropout_prob: 0.1, learn_sigma: false}}
diffusion: {{time_input: dit_index, label_drop: 0.1, null_label: 2}}
data: {{dataset: latents, root: {out}, num_classes: 2}}
train: {{steps: 2, batch_size: 4, log_every: 1, sample_every: 2, sample_n: 4}}
sample: {{solver: {{type: ddim, steps: 2}}, cfg: {{scale: 1.0, convention: dit, channels: null}}}}
""")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert "draws no sample grids" not in capsys.readouterr().out
    with Image.open(tmp_path / "run" / "samples" / "step_0000002.png") as grid:  # 2x2 of RES px RGB images
        assert grid.mode == "RGB" and grid.width > 2 * RES
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--vae", str(vae_dir), "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert f"wrote 2 images ({RES}x{RES})" in capsys.readouterr().out


@pytest.mark.parametrize("data, latent", [
    ({"dataset": "latents"}, True), ({"dataset": "latents", "latent": True}, True),
    ({"dataset": "imagenet", "latent": True}, True), ({"dataset": "imagenet"}, False),
    ({"latent": True}, True), ({}, False),  # synthetic: stand-in latents where the recipe says so
    ({"dataset": "emoji32"}, False), ({"dataset": "image_folder"}, False),
    ({"dataset": "not_installed_plugin", "latent": True}, True), ({"dataset": "not_installed_plugin"}, False)])
def test_whether_a_model_works_on_latents_is_what_its_dataset_gives(data, latent):
    from zoo.training.data import gives_latents

    assert gives_latents(data) is latent


@pytest.mark.parametrize("sets, says", [
    (["data.latent=true"], "data.latent is true, but dataset 'emoji32' gives images (pixels)"),
    (["data.dataset=image_folder", "data.root=.", "data.latent=true"],
     "data.latent is true, but dataset 'image_folder' gives images (pixels)"),
    (["data.dataset=latents", "data.root=.", "data.latent=false"],
     "data.latent is false, but dataset 'latents' gives VAE latents")])
def test_a_data_latent_its_dataset_contradicts_is_refused(sets, says, capsys):
    """emoji32 with latent: true trained on pixels and then found no VAE for its grids; it is one line now.
    The fix names every dataset data.latent switches (it said 'imagenet's', and synthetic's switches too)."""
    emoji = Path(__file__).resolve().parent.parent / "recipes" / "emoji32" / "dit.yaml"
    assert main(["build", str(emoji), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert "(remove data.latent (it chooses between latents and images only for imagenet and synthetic);" in err


@pytest.mark.parametrize("recipe, words", [
    ("recipes/dimr_xl_2r.yaml", ["ImageNet 256x256 latents", "Stable Diffusion VAE", "zoo prepare-latents",
                                 "--set data.root="]),
    ("recipes/uvit_m_4.yaml", ["ImageNet images at 64x64", "root/CLASS/*.JPEG", "--set data.root="]),
    ("recipes/dimr_m_3r.yaml", ["ImageNet images at 64x64", "root/CLASS/*.JPEG", "--set data.root="]),
])
def test_paper_recipes_without_data_say_what_they_need_in_one_line(tmp_path, capsys, recipe, words):
    assert main(["train", recipe, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error:")
    for word in words:
        assert word in err
    assert not (tmp_path / "run" / "last").exists()


def test_image_folder_lists_the_files_torchvision_lists_in_its_order(tmp_path):
    """Nested subfolders, upper-case and .tif suffixes, non-images: index i is torchvision's image i."""
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    from zoo.training.data import ImageFolder

    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    for rel in ("b/z.png", "b/a.JPEG", "b/deep/er/x.tif", "b/deep/y.webp", "a/1.jpg", "a/sub/0.bmp",
                "a/skip.gif", "c/only.ppm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / rel)
    (tmp_path / "b" / "notes.txt").write_text("not an image")

    ours = ImageFolder(tmp_path, 8)
    theirs = TorchvisionImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes == ["a", "b", "c"]
    assert [(str(f), y) for f, y in ours.items] == theirs.samples
    assert len(ours) == 7  # the .gif and the .txt are not images to either

    # A folder with no images would take a label and shift the others': refused by both, naming it.
    (tmp_path / ".ipynb_checkpoints").mkdir()
    with pytest.raises(FileNotFoundError):
        TorchvisionImageFolder(str(tmp_path))
    with pytest.raises(UserError, match=r"class folder .*\.ipynb_checkpoints holds no images: no files with other "
                                        r"suffixes there; "
                                        r".* \(move folders"):
        ImageFolder(tmp_path, 8)


def test_a_folder_of_dataset_splits_is_not_taken_for_classes(tmp_path):
    """imagenet/ (train/ and val/) given for imagenet/train listed two "classes" and would encode or train on
    them for hours; a dataset whose classes merely include a split's name is read as before."""
    from zoo.training.data import ImageFolder

    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    for rel in ("val/n01/0.png", "Train/n01/0.png", "Train/n02/1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / rel)
    (tmp_path / "test").mkdir()  # an empty split: still said as splits, not as an empty class folder
    with pytest.raises(UserError, match=rf"the subfolders of {re.escape(str(tmp_path))} \(Train, test, val\) are the "
                                        rf"splits of a dataset, not its classes \(pass one split's folder, e.g. "
                                        rf"{re.escape(str(tmp_path / 'Train'))}\)"):
        ImageFolder(tmp_path, 8)
    assert ImageFolder(tmp_path / "Train", 8).classes == ["n01", "n02"]
    (tmp_path / "test").rmdir()
    (tmp_path / "cat").mkdir()
    Image.fromarray(pixels).save(tmp_path / "cat" / "0.png")
    assert ImageFolder(tmp_path, 8).classes == ["Train", "cat", "val"]


def test_a_dataset_root_holding_one_split_is_not_one_class(tmp_path):
    """imagenet/ with train/ alone (val/ not unpacked yet) was read as one class, 'train': every image label 0."""
    from zoo.training.data import ImageFolder

    for rel in ("train/n01/0.png", "train/n02/1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(tmp_path / rel)
    with pytest.raises(UserError, match=r"\(train\) are the splits of a dataset, not its classes") as err:
        ImageFolder(tmp_path, 8)
    assert str(tmp_path / "train") in err.value.suggestion


def test_a_macos_metadata_folder_is_not_said_to_hold_files_to_convert(tmp_path):
    """__MACOSX/cls/._0.png (an AppleDouble file) was counted as '1 file with other suffixes skipped', with
    'convert those files' as the fix: it is metadata, and the fix is to move __MACOSX out."""
    from zoo.training.data import ImageFolder

    (tmp_path / "cls").mkdir()
    Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(tmp_path / "cls" / "0.png")
    (tmp_path / "__MACOSX" / "cls").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cls" / "._0.png").write_bytes(b"\0\5\26\7junk")
    (tmp_path / "__MACOSX" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(UserError, match=r"__MACOSX holds no images: no files with other suffixes there") as err:
        ImageFolder(tmp_path, 8)
    assert "convert" not in err.value.suggestion and "__MACOSX" in err.value.suggestion


def test_a_class_folder_of_other_formats_says_what_is_read_and_what_was_skipped(tmp_path, vae_dir, capsys):
    """'class folder X holds no images' beside a folder of .gif files: the user saw no reason."""
    from zoo.training.data import ImageFolder

    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "0.png")
    for rel in ("gifs/0.gif", "gifs/1.gif", "gifs/more/2.gif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / rel)
    reads = ".jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp in any case"
    with pytest.raises(UserError) as err:
        ImageFolder(tmp_path, 8)
    assert str(err.value) == (f"class folder {tmp_path / 'gifs'} holds no images: 3 files with other suffixes "
                              f"skipped there; images are files ending {reads} (convert those files to one of "
                              "these formats, or move folders that are not classes (e.g. .ipynb_checkpoints, "
                              "__MACOSX) out of the image folder)")
    # Only .gif class folders: nothing to encode, said the same way by prepare-latents.
    (tmp_path / "a" / "0.png").rename(tmp_path / "a" / "0.gif")
    argv = ["prepare-latents", str(tmp_path), "--vae", str(vae_dir), "--out", str(tmp_path.parent / "lat")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"zoo: error: the 2 class folders under {tmp_path} hold no images: 4 files "
                                       f"with other suffixes skipped there; images are files ending {reads} "
                                       "(convert them to one of these formats)\n")


def test_a_symlink_loop_in_a_class_folder_is_not_followed(tmp_path):
    """torchvision follows a link back up the tree until the path is too long (here 12 images became
    hundreds, the other class's among them under this label); a link to another folder is kept."""
    from zoo.training.data import ImageFolder

    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    for rel in ("cat/0.png", "cat/1.png", "dog/0.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / rel)
    (tmp_path / "cat" / "up").symlink_to("..")
    (tmp_path / "cat" / "self").symlink_to(".")
    (tmp_path / "cat" / "dogs").symlink_to("../dog")
    items = [(str(f.relative_to(tmp_path)), y) for f, y in ImageFolder(tmp_path, 8).items]
    assert items == [("cat/0.png", 0), ("cat/1.png", 0), ("cat/dogs/0.png", 0), ("dog/0.png", 1)]
    # a loop through two links (dog/cats -> cat, whose dogs -> dog): each class once, not 20 times each
    (tmp_path / "dog" / "cats").symlink_to("../cat")
    items = [(str(f.relative_to(tmp_path)), y) for f, y in ImageFolder(tmp_path, 8).items]
    assert items == [("cat/0.png", 0), ("cat/1.png", 0), ("cat/dogs/0.png", 0), ("dog/0.png", 1),
                     ("dog/cats/0.png", 1), ("dog/cats/1.png", 1)]


def test_a_pil_warning_comes_once_not_once_per_image_read(tmp_path, monkeypatch):
    """Each read reset Python's once-per-place warning record (catch_warnings per read): a warning PIL gives
    about a file's content (it was a palette PNG's transparency) came again for every image, every epoch,
    in training, prepare-latents and eval."""
    import warnings

    import zoo.training.crop as crop
    import zoo.training.data as data
    from zoo.training.data import ImageFolder

    (tmp_path / "c").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (10, 60 * i, 30)).save(tmp_path / "c" / f"{i}.png")
    to_rgb = crop.to_rgb

    def warning_decoder(image):  # one place that warns on every image, as PIL's decoders do
        warnings.warn("a decoder's warning about this file", UserWarning)
        return to_rgb(image)

    monkeypatch.setattr(crop, "to_rgb", warning_decoder)
    ds = ImageFolder(tmp_path, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # once per place, as Python shows a warning unless told otherwise
        monkeypatch.setattr(data, "_SIZE_WARNING_QUIET", False)  # as in a fresh process
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
    assert len([w for w in seen if "a decoder's warning" in str(w.message)]) == 1


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a mid-grey image comes out white)."""
    import numpy as np

    from zoo.training.crop import to_rgb

    ramp = (np.arange(256, dtype=np.uint16)[None, :] * 257).repeat(4, axis=0)  # 0..65535: 8-bit value v is v*257
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (4, 256, 3) and (rgb[0, :, 0] == np.arange(256)).all()
    with Image.open(tmp_path / "g16.png") as im:
        assert (np.asarray(im.convert("RGB"))[0, 1:, 0] == 255).all()  # what plain PIL gives


def test_a_broken_image_read_in_a_worker_is_one_line_naming_it(tmp_path, vae_dir, image_dir, capsys):
    """The worker is ended with the error: it ignores SIGTERM, and an iterator the error's traceback
    kept alive hung the exit (multiprocessing's join on a worker its SIGTERM had not ended)."""
    import multiprocessing
    import shutil

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    (images / "n01" / "n01_9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(["prepare-latents", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "lat"),
                 "--resolution", str(RES), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("zoo")]
    assert len(lines) == 1, err  # PIL's own reason in the middle depends on its version
    assert lines[0].startswith(f"zoo: error: cannot read image {images / 'n01' / 'n01_9.png'}: ")
    assert lines[0].endswith("(delete or replace the file, then run the same command again: the shards written "
                             "so far are kept)")
    assert "Traceback" not in err and not list((tmp_path / "lat").glob("shard_*"))
    assert not multiprocessing.active_children()


def test_a_png_with_a_broken_chunk_is_one_line_not_a_syntax_error(tmp_path):
    """PIL reports a chunk length that runs into the next chunk as SyntaxError('broken PNG file'),
    which escaped as a traceback from prepare-latents and from image_folder training."""
    import io
    import struct

    import numpy as np

    from zoo.training.data import ImageFolder

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") - 4
    data[at:at + 4] = struct.pack(">I", struct.unpack(">I", data[at:at + 4])[0] - 100)  # IDAT 100 bytes short
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png: broken PNG file"):
        ImageFolder(tmp_path, 16)[0]


def test_prepared_latents_are_checked_against_the_model_and_a_broken_shard_is_named(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    data = {"dataset": "latents", "root": str(out)}
    assert len(build_dataset(data, (4, 8, 8), 2)) == 10
    # Two class folders for a one-class model: refused before training, not trained as the null label.
    with pytest.raises(Exception, match="dataset 'latents' has 2 classes, the model has 1"):
        build_dataset(data, (4, 8, 8), 1)
    (out / shard_name(1)).write_bytes((out / shard_name(1)).read_bytes()[:100])  # truncated
    with pytest.raises(Exception, match=f"cannot read latent shard {out / shard_name(1)}: not a complete safetensors"):
        build_dataset(data, (4, 8, 8), 2)


def test_plain_latent_shards_of_two_shapes_are_refused_naming_the_shard(tmp_path):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 4, 8, 8), "labels": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "a.safetensors"))
    save_file({"latents": torch.zeros(2, 4, 4, 4), "labels": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(Exception, match=r"b.safetensors holds latents of shape \(4, 4, 4\), the shards before it \(4, 8, 8\)"):
        build_dataset({"dataset": "latents", "root": str(tmp_path)}, (4, 8, 8), 1)


def test_prepared_latents_are_not_flipped_a_second_time(tmp_path, vae_dir, image_dir):
    """They draw the image's or its mirror image's encoding; a latent-space flip on top would be a second flip."""
    import zoo
    from safetensors.torch import save_file

    from zoo.training import Trainer

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"latents": torch.zeros(8, 4, 8, 8), "labels": torch.zeros(8, dtype=torch.int64)},
              str(plain / "a.safetensors"))
    flips = {}
    for name, root in (("prepared", out), ("plain", plain)):
        recipe = zoo.load_recipe(LATENT_RECIPE, [
            "data.dataset=latents", f"data.root={root}", "data.num_classes=2", "data.random_flip=true",
            f"data.image_size={RES}", "train.batch_size=4"])
        flips[name] = Trainer(recipe, tmp_path / f"run_{name}", log=lambda *_: None).flip
    assert flips == {"prepared": False, "plain": True}


@pytest.mark.parametrize("flag", [None, "cuda"])
def test_under_torchrun_each_process_encodes_on_its_own_gpu(tmp_path, monkeypatch, flag):
    import zoo.guards
    import zoo.latents

    seen = {}
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(zoo.guards, "resolve_device", lambda name: torch.device(name or "cuda"))  # no GPU here
    monkeypatch.setattr(zoo.latents, "prepare_latents", lambda *a, device, **k: seen.setdefault("device", device))
    argv = ["prepare-latents", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "lat")]
    assert main(argv + (["--device", flag] if flag else [])) == 0
    assert seen["device"] == "cuda:3"


def _copy_images(image_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(image_dir, tmp_path / "images"))


def _rows(out):
    """Every row of a finished output as (images.txt line, mean of view 0) in row order."""
    manifest = json.loads((out / MANIFEST).read_text())
    lines = (out / manifest["images"]["file"]).read_text().splitlines()
    means = torch.cat([load_file(str(out / s["file"]))["mean"][:, 0] for s in manifest["shards"]])
    labels = torch.cat([load_file(str(out / s["file"]))["labels"] for s in manifest["shards"]])
    assert [int(line.split("\t")[1]) for line in lines] == labels.tolist()
    return lines, means


def test_changed_images_keep_the_shards_of_unchanged_rows_and_re_encode_the_rest(tmp_path, vae_dir, image_dir,
                                                                                 capsys):
    """A deleted or added image shifts the rows after it: those shards are encoded again, the ones
    before it kept, and the result is what a fresh run over the new folder gives."""
    images, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(images, vae_dir, out, **kw)  # rows: n01_0..4 (label 0), n02_0..4 (label 1)
    stamp = lambda k: os.stat(out / shard_name(k)).st_mtime_ns  # noqa: E731
    before = {k: stamp(k) for k in range(3)}

    (images / "n01" / "n01_2.png").unlink()  # row 2: shard 0 holds it, so every shard changes
    (images / "n02" / "n02_9.png").write_bytes((images / "n02" / "n02_0.png").read_bytes())  # a new last row
    lines = []
    assert prepare_latents(images, vae_dir, out, log=lines.append, **kw)
    assert "changed since" in lines[1] and "encoding 3 (10 images)" in lines[2]  # lines[0]: the VAE weights
    assert [stamp(k) != before[k] for k in range(3)] == [True, True, True]
    fresh = tmp_path / "fresh"
    prepare_latents(images, vae_dir, fresh, **kw)
    got, want = _rows(out), _rows(fresh)
    assert got[0] == want[0] and "n01/n01_2.png\t0" not in got[0] and got[0][-1] == "n02/n02_9.png\t1"
    # float32 convolutions of batches of another make-up may sum in another order: ~1e-7 relative, values O(1)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)

    kept = {k: stamp(k) for k in range(3)}
    for name in ("n02_9.png", "n02_4.png", "n02_3.JPEG"):  # the last three rows: 7 images, 2 shards
        (images / "n02" / name).unlink()
    assert prepare_latents(images, vae_dir, out, log=lines.append, **kw)
    assert "encoding 1 (3 images)" in lines[-1]  # shard 0 kept, shard 1 re-encoded, shard 2 gone
    assert stamp(0) == kept[0] and sorted(p.name for p in out.glob("shard_*")) == [shard_name(0), shard_name(1)]
    assert len(_rows(out)[0]) == json.loads((out / MANIFEST).read_text())["num_images"] == 7


def test_another_image_folder_into_a_finished_output_is_refused_and_a_moved_one_is_not(tmp_path, vae_dir,
                                                                                        image_dir):
    """`... val --out lat` typed for `... train --out lat` deleted the manifest and every shard of the
    train images it did not share; it is refused now, the output untouched. The same images under
    a new path (a moved folder) are the same output."""
    import shutil

    images, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(images, vae_dir, out, **kw)
    other = tmp_path / "val"
    (other / "n01").mkdir(parents=True)
    shutil.copy(images / "n01" / "n01_0.png", other / "n01")
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(UserError, match=f"{out} holds the latents of {images}, not of {other} "
                                        r"\(another image list\) \(pass .* or use a new --out; if the folder moved"):
        prepare_latents(other, vae_dir, out, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files

    moved = Path(shutil.move(images, tmp_path / "moved"))
    lines = []
    assert prepare_latents(moved, vae_dir, out, log=lines.append, **kw)  # same rows: nothing to encode
    assert "none left to encode" in lines[-1] and json.loads((out / PLAN).read_text())["root"] == str(moved)
    assert all(p.stat().st_mtime_ns == files[p.name] for p in out.glob("shard_*"))
    again = Path(shutil.move(moved, tmp_path / "again"))
    (again / "n02" / "n02_0.png").unlink()  # moved and changed: the plan's folder is let go of by hand
    with pytest.raises(UserError, match=f"holds the latents of {moved}, not of {again}"):
        prepare_latents(again, vae_dir, out, **kw)
    (out / PLAN).unlink()
    assert prepare_latents(again, vae_dir, out, log=lines.append, **kw)
    assert "encoding 2 (" in lines[-1]  # shard 0 (rows before the deleted image) kept


def test_a_split_with_the_same_file_names_is_not_taken_for_a_moved_folder(tmp_path, vae_dir, image_dir):
    """train/ and val/ holding the same names (other pixels): `... val --out lat` after `... train --out lat`
    passed as a move, encoded nothing and rewrote the manifest's root to val/. A copy with the same bytes
    (the old folder still there) is still the same output."""
    import shutil

    from zoo.latents import MANIFEST

    train, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(train, vae_dir, out, **kw)
    val = Path(shutil.copytree(train, tmp_path / "val"))
    last = sorted(val.glob("n02/*"))[-1]
    with Image.open(last) as im:
        flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(last)  # one file of ten differs: the probes reach the list's last row
    with pytest.raises(UserError, match=f"{out} holds the latents of {train}, not of {val}: the file names are the "
                                        f"same, but n02/{last.name} differs between them"):
        prepare_latents(val, vae_dir, out, **kw)
    assert json.loads((out / MANIFEST).read_text())["root"] == str(train)
    copy = Path(shutil.copytree(train, tmp_path / "copy"))  # the same bytes: a copy, followed
    assert prepare_latents(copy, vae_dir, out, **kw)
    assert json.loads((out / PLAN).read_text())["root"] == str(copy)


def test_resume_removes_a_killed_writes_temporary_file(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    prepare_latents(image_dir, vae_dir, out, **kw)
    (out / shard_name(1)).unlink()
    leftover = out / f".{shard_name(1)}.tmp-0123abcd"  # what a SIGKILL inside the shard's write leaves
    leftover.write_bytes(b"half a shard")
    assert prepare_latents(image_dir, vae_dir, out, **kw)
    assert not leftover.exists() and (out / shard_name(1)).is_file()


def test_shards_and_checkpoints_are_readable_by_others_as_plain_files_are(tmp_path, vae_dir, image_dir):
    """safetensors creates its files 0600; zoo gives them the mode open() would (0666 less the umask)."""
    import stat

    from zoo.checkpoint import save_checkpoint

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    (tmp_path / "plain.txt").write_text("x")
    want = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    save_checkpoint(tmp_path / "ckpt", torch.nn.Linear(2, 2), {"model": {"type": "dit"}})
    for f in [out / shard_name(0), out / MANIFEST, tmp_path / "ckpt" / "model.safetensors"]:
        assert stat.S_IMODE(os.stat(f).st_mode) == want, f


def test_a_vae_with_other_settings_is_refused_even_with_the_same_weights(tmp_path, vae_dir, image_dir, capsys):
    import shutil

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    other = Path(shutil.copytree(vae_dir, tmp_path / "vae_other"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    args = ["prepare-latents", str(image_dir), "--vae", str(other), "--out", str(out), "--resolution", str(RES),
            "--shard-size", "6", "--workers", "0"]
    manifest = (out / MANIFEST).read_text()
    assert main(args) == 2
    assert "(vae scaling_factor differs)" in capsys.readouterr().err
    assert (out / MANIFEST).read_text() == manifest  # untouched
    # A VAE that shifts its latents (SD3, FLUX) cannot be undone by zoo's z / scale: refused up front.
    (other / "config.json").write_text(json.dumps({**config, "shift_factor": 0.0609}))
    assert main(args[:4] + ["--out", str(tmp_path / "lat2")] + args[6:]) == 2
    err = capsys.readouterr().err
    assert "shift_factor 0.0609" in err and len(err.strip().splitlines()) == 1


def test_out_or_image_dir_of_the_wrong_kind_is_one_line(tmp_path, vae_dir, image_dir, capsys):
    (tmp_path / "file").write_text("x")
    base = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--resolution", str(RES), "--workers", "0"]
    assert main(base + ["--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err
    base[1] = str(tmp_path / "file")
    assert main(base + ["--out", str(tmp_path / "lat")]) == 2
    assert f"image folder {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_an_out_holding_other_files_is_refused_and_an_empty_or_earlier_one_is_not(tmp_path, vae_dir, image_dir,
                                                                                   capsys):
    """A user's folder or a zoo train run as --out took the shards beside its files (convert and export refuse
    such a directory); an empty one, or an earlier output resumed, is written."""
    base = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--resolution", str(RES), "--workers", "0"]
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("notes.txt", "a.safetensors", "b", "c"):
        (mine / name).write_text("precious")
    assert main(base + ["--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"--out {mine} holds files that are not a zoo prepare-latents output (a.safetensors, b, c and 1 more)" \
        in err and "give a new or empty directory" in err
    assert sorted(p.name for p in mine.iterdir()) == ["a.safetensors", "b", "c", "notes.txt"]
    (tmp_path / "empty").mkdir()
    assert main(base + ["--out", str(tmp_path / "empty")]) == 0
    (tmp_path / "empty" / "shard_00000.safetensors").unlink()  # an earlier output, resumed
    assert main(base + ["--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "shard_00000.safetensors").is_file()


@pytest.mark.parametrize("mistake", ["folder", "gpus"])
def test_under_torchrun_a_setup_mistake_is_reported_by_rank_0_only(tmp_path, vae_dir, capsys, monkeypatch, mistake):
    """Every rank lists the same folder, or sees the same too few GPUs: N identical lines said nothing
    more than rank 0's one. More processes than GPUs was a CUDA traceback from the ranks past the last."""
    import zoo.cli

    monkeypatch.setattr(zoo.cli, "QUIET_RANK_WAIT_S", 0.0)  # the wait for rank 0's line under torchrun
    argv = ["prepare-latents", str(tmp_path / "none"), "--vae", str(vae_dir), "--out", str(tmp_path / "lat")]
    if mistake == "gpus":
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == lines
    assert ("this node has 1 CUDA GPU" in err) == (mistake == "gpus")


def test_a_file_name_that_is_not_utf8_is_encoded_and_listed(tmp_path, vae_dir, image_dir):
    import sys

    if sys.platform == "darwin":  # APFS refuses names that are not UTF-8
        pytest.skip("the filesystem holds UTF-8 names only")
    images, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    os.rename(images / "n01" / "n01_0.png", os.fsencode(images / "n01") + b"/caf\xe9.png")
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(images, vae_dir, out, **kw)
    assert b"n01/caf\xe9.png\t0\n" in (out / "images.txt").read_bytes()
    assert prepare_latents(images, vae_dir, out, **kw)  # the rerun finds every shard current


def test_an_output_of_another_format_version_is_named_as_such(tmp_path, vae_dir, image_dir, capsys):
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    plan = json.loads((out / PLAN).read_text())
    (out / PLAN).write_text(json.dumps({**plan, "version": 1}))
    assert main(["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution",
                 str(RES), "--shard-size", "6", "--workers", "0"]) == 2
    assert "written by another version of zoo prepare-latents (format version 1" in capsys.readouterr().err


def test_a_killed_write_of_a_shard_the_plan_no_longer_has_is_removed(tmp_path, vae_dir, image_dir):
    images, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    prepare_latents(images, vae_dir, out, **kw)
    leftover = out / f".{shard_name(2)}.tmp-0123abcd"
    leftover.write_bytes(b"half a shard")
    for name in ("n02_3.JPEG", "n02_4.png"):  # 8 images: shards 0 and 1 only
        (images / "n02" / name).unlink()
    assert prepare_latents(images, vae_dir, out, **kw)
    assert not leftover.exists() and not (out / shard_name(2)).exists()


def test_more_processes_than_shards_get_a_hint_for_the_shard_size(tmp_path, vae_dir, image_dir):
    lines = []
    assert prepare_latents(image_dir, vae_dir, tmp_path / "lat", resolution=RES, batch_size=5, num_workers=0,
                           rank=0, world=4, log=lines.append)  # 10 images, one shard of up to 10000
    assert lines[-1] == "note: 1 shard for 4 processes, so 3 of them have nothing to encode; --shard-size 3 gives each process one"


def _group_ends(pgid: int, within: float) -> bool:
    """Whether every process of group ``pgid`` is gone within ``within`` seconds."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


_SLOW_READS = """
import sys, time
import zoo.training.data as data
read = data.ImageFolder.__getitem__
data.ImageFolder.__getitem__ = lambda self, i: (time.sleep(0.3) if i >= 2 else None) or read(self, i)
from zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum, status, line", [
    (2, 130, "zoo: interrupted; the shards written are kept, and the same command encodes the rest"),
    (15, 143, "zoo: stopped by SIGTERM; the shards written are kept, and the same command encodes the rest"),
], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_with_workers_is_one_line_and_the_rerun_finishes(tmp_path, vae_dir, image_dir, signum, status, line):
    """A terminal's Ctrl-C signals the process group: a worker died of it ('DataLoader worker exited
    unexpectedly', a traceback), or it landed while the next shard's workers forked and the run went
    on to exit 0. Workers now ignore it and are forked once. Images past the first shard are read
    slowly here, so the signal comes while a later shard is being read. SIGTERM (SLURM, torchrun)
    ended the process with no word, and its workers outlived it."""
    import subprocess
    import sys
    import time

    out = tmp_path / "lat"
    argv = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--batch-size", "1", "--shard-size", "2", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_READS, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / shard_name(0)).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == status, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    bar = lambda x: not x.strip() or x.startswith("encode:")  # noqa: E731 (splitlines splits at \r)
    assert [x for x in err.splitlines() if not bar(x)] == [line], err
    assert _group_ends(proc.pid, within=2.0)  # the workers ended with it (uncleaned, they lived ~5 s more)
    assert not (out / MANIFEST).exists()
    first = os.stat(out / shard_name(0)).st_mtime_ns
    assert main(argv) == 0  # the rerun encodes what is missing, the first shard kept
    assert os.stat(out / shard_name(0)).st_mtime_ns == first
    fresh = tmp_path / "fresh"
    prepare_latents(image_dir, vae_dir, fresh, resolution=RES, batch_size=1, shard_size=2, num_workers=0)
    got, want = _rows(out), _rows(fresh)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_file_names_with_tabs_newlines_and_backslashes_are_one_escaped_line_each(tmp_path, vae_dir, image_dir):
    """A newline in a name split its row in two and every later row named the wrong file."""
    import re
    import sys

    from zoo.latents import _path_of
    from zoo.training.data import ImageFolder

    if sys.platform == "win32":
        pytest.skip("no such file names")
    images, out = _copy_images(image_dir, tmp_path), tmp_path / "lat"
    for old, new in (("n01_0.png", "a\nb.png"), ("n01_1.JPEG", "a\tb.JPEG"), ("n01_2.png", "a\\b\r.png")):
        (images / "n01" / old).rename(images / "n01" / new)
    kw = dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(images, vae_dir, out, **kw)
    lines = (out / "images.txt").read_text().split("\n")[:-1]
    assert lines[:3] == ["n01/a\\tb.JPEG\t0", "n01/a\\nb.png\t0", "n01/a\\\\b\\r.png\t0"]
    assert lines[3:6] == ["n01/n01_3.JPEG\t0", "n01/n01_4.png\t0", "n02/n02_0.png\t1"]  # other names as before
    unescape = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    for line, (path, label) in zip(lines, ImageFolder(images, RES).items, strict=True):
        name, y = line.split("\t")
        assert images / re.sub(r"\\(.)", lambda m: unescape[m[1]], name) == path and int(y) == label
        assert images / _path_of(f"{line}\n") == path  # what the moved-folder check reads back
    lines = []
    assert prepare_latents(images, vae_dir, out, log=lines.append, **kw)
    assert lines[-1].endswith("none left to encode")  # the rows' digests are those the shards carry


@pytest.mark.parametrize("where", ["latents", "n01/deep/latents", ".", "link/latents"])
def test_an_out_inside_the_image_folder_is_refused_before_anything_is_written(tmp_path, vae_dir, image_dir,
                                                                              where, capsys):
    """The first run worked, and its rerun (the resume) read IMAGE_DIR/latents as a class folder
    without images and stopped."""
    images = _copy_images(image_dir, tmp_path)
    (tmp_path / "link").symlink_to(images)
    out = (images if where != "link/latents" else tmp_path) / where
    before = sorted(images.rglob("*"))
    argv = ["prepare-latents", str(images), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--workers", "0"]
    assert main(argv) == 2
    why = ("is the image folder: the shards would lie among its class folders" if where == "." else
           f"is inside the image folder {images}: a rerun would list it with the images (as a class folder)")
    assert capsys.readouterr().err == f"zoo: error: --out {out} {why} (give an --out outside the image folder)\n"
    assert sorted(images.rglob("*")) == before


def test_an_earlier_out_inside_the_image_folder_is_told_to_move_out(tmp_path, vae_dir, image_dir, capsys):
    images = _copy_images(image_dir, tmp_path)
    outside = tmp_path / "lat"
    prepare_latents(images, vae_dir, outside, resolution=RES, batch_size=5, shard_size=6, num_workers=0)
    inside = outside.rename(images / "lat")  # as an earlier zoo left it
    argv = ["prepare-latents", str(images), "--vae", str(vae_dir), "--out", str(inside), "--resolution", str(RES),
            "--shard-size", "6", "--workers", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.endswith(f"(give an --out outside the image folder (move {inside} there to keep "
                                            "its shards))\n")


def test_counts_of_one_are_singular(tmp_path, vae_dir, image_dir):
    (tmp_path / "n01").mkdir()
    (tmp_path / "n01" / "a.png").write_bytes((image_dir / "n01" / "n01_0.png").read_bytes())
    lines = []
    assert prepare_latents(tmp_path, vae_dir, tmp_path.parent / f"{tmp_path.name}_lat", resolution=RES,
                           num_workers=0, log=lines.append)
    assert lines == [f"VAE weights {(vae_dir / 'diffusion_pytorch_model.safetensors').resolve()}",
                     f"1 image in 1 class under {tmp_path}; 1 shard of up to 10000 in "
                     f"{tmp_path.parent / f'{tmp_path.name}_lat'}, encoding 1 (1 image) on cpu"]


def test_the_workers_are_forked_once_for_all_shards(tmp_path, vae_dir, image_dir, monkeypatch):
    """A DataLoader per shard forked its workers again for every shard: each fork was a moment
    where a Ctrl-C could be lost."""
    from torch.utils.data import DataLoader

    made = []
    real = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: made.append(self) or real(self))
    out = tmp_path / "lat"
    assert prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=3, shard_size=4, num_workers=1)
    assert len(made) == 1
    fresh = tmp_path / "fresh"  # batches of 3 in shards of 4: a shard's last batch is short, never shared
    prepare_latents(image_dir, vae_dir, fresh, resolution=RES, batch_size=1, shard_size=4, num_workers=0)
    got, want = _rows(out), _rows(fresh)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_a_ctrl_c_while_the_workers_fork_is_delivered_after(tmp_path, vae_dir, image_dir, monkeypatch):
    """One that landed in an at-fork hook (logging's) was printed as 'Exception ignored' and lost:
    the run went on to the end. Here the hook is imitated by swallowing it during iter()."""
    import signal

    from torch.utils.data import DataLoader

    real = DataLoader.__iter__

    def forking(self):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what an at-fork hook does with it
        return real(self)

    monkeypatch.setattr(DataLoader, "__iter__", forking)
    out = tmp_path / "lat"
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(image_dir, vae_dir, out, resolution=RES, batch_size=3, shard_size=4, num_workers=1)
    assert not list(out.glob("shard_*")) and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_out_holding_shard_files_zoo_did_not_write_is_refused_and_kept(tmp_path, vae_dir, image_dir, capsys):
    """A directory of the user's own latent shards given as --out: shard_00000 was replaced and the
    others past the plan's last shard deleted, exit 0."""
    from safetensors.torch import save_file

    out = tmp_path / "mine"
    out.mkdir()
    for k in (0, 7):
        save_file({"latents": torch.zeros(3, 4, 2, 2), "labels": torch.zeros(3, dtype=torch.long)}, str(out / shard_name(k)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds shard_00000.safetensors, shard_00007.safetensors, which zoo prepare-latents did not " \
           "write" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Someone else's images.txt alone is refused too; the same list (a run killed before its plan) is not.
    other = tmp_path / "other"
    other.mkdir()
    (other / "images.txt").write_text("mine\t0\n")
    into = lambda d: argv[:5] + [str(d)] + argv[6:]  # noqa: E731
    assert main(into(other)) == 2
    assert "holds images.txt, which zoo prepare-latents did not write" in capsys.readouterr().err
    done = tmp_path / "done"
    assert main(into(done)) == 0
    (other / "images.txt").write_bytes((done / "images.txt").read_bytes())
    assert main(into(other)) == 0
    (done / PLAN).unlink()  # the folder moved: its plan deleted, its own shards, manifest and list are reused
    capsys.readouterr()
    assert main(into(done)) == 0
    assert "none left to encode" in capsys.readouterr().out
    # With a plan, a shard of the user's inside the plan's range was encoded over, and one past it deleted.
    for k in (5, 0):
        mine = {"latents": torch.zeros(2, 4, 2, 2), "labels": torch.zeros(2, dtype=torch.long)}
        if k == 0:
            (done / shard_name(0)).unlink()
        save_file(mine, str(done / shard_name(k)), metadata={"note": "mine"})
        before = (done / shard_name(k)).read_bytes()
        assert main(into(done)) == 2
        assert f"holds {shard_name(k)}, which zoo prepare-latents did not write; encoding there would replace or " \
               "delete it" in capsys.readouterr().err
        assert (done / shard_name(k)).read_bytes() == before
        (done / shard_name(k)).unlink()
    assert main(into(done)) == 0 and (done / shard_name(0)).is_file()


def test_shards_of_another_vae_are_encoded_again_once_the_plan_is_deleted(tmp_path, vae_dir, image_dir):
    """Deleting prepare.json (as for a moved folder) and running with another VAE or resolution kept every
    shard of the same rows: the manifest named the new VAE over the old VAE's latents (or their shape)."""
    import shutil

    from diffusers import AutoencoderKL

    out, kw = tmp_path / "lat", dict(batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(image_dir, vae_dir, out, resolution=RES, **kw)
    first = {p.name: p.read_bytes() for p in out.glob("shard_*")}
    other = Path(shutil.copytree(vae_dir, tmp_path / "vae2"))
    weights = next(p for p in other.iterdir() if p.suffix == ".safetensors")
    vae = AutoencoderKL.from_pretrained(str(other))
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(1.5)
    weights.unlink()
    vae.save_pretrained(str(other))
    for vae_used, resolution in ((other, RES), (other, 2 * RES)):
        (out / PLAN).unlink()
        lines = []
        assert prepare_latents(image_dir, vae_used, out, resolution=resolution, log=lines.append, **kw)
        assert "encoding 3 (10 images)" in lines[-1]  # every shard again, none kept
        manifest = json.loads((out / MANIFEST).read_text())
        with safe_open(str(out / shard_name(0)), framework="pt") as f:
            assert list(f.get_slice("mean").get_shape()[2:]) == manifest["latent_shape"]
    assert all((out / name).read_bytes() != data for name, data in first.items())


def test_shards_from_before_the_settings_digest_are_kept_under_their_plan(tmp_path, vae_dir, image_dir):
    """Shards written before they carried settings_sha256 were all encoded again on a resume (hours on
    ImageNet) although the plan beside them vouched for their settings; without that plan they are."""
    from safetensors.torch import save_file

    out, kw = tmp_path / "lat", dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(image_dir, vae_dir, out, **kw)
    with safe_open(str(out / shard_name(1)), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del meta["settings_sha256"]
    save_file(tensors, str(out / shard_name(1)), metadata=meta)  # as an earlier zoo wrote it
    (out / shard_name(2)).unlink()
    lines = []
    assert prepare_latents(image_dir, vae_dir, out, log=lines.append, **kw)
    assert "encoding 1 (2 images)" in lines[-1]  # shard 2 only
    (out / PLAN).unlink()
    manifest = out / MANIFEST
    assert prepare_latents(image_dir, vae_dir, out, log=lines.append, **kw)
    assert "encoding 1 (4 images)" in lines[-1] and manifest.is_file()  # shard 1: nothing vouches for it now


def test_a_manifest_is_deleted_until_the_shards_are_checked_when_there_is_no_plan(tmp_path, vae_dir, image_dir,
                                                                                    monkeypatch):
    """A rerun without prepare.json with another VAE, interrupted, left the old manifest over a mix of
    old and new shards, and the trainer read them as one output."""
    import zoo.latents as latents

    out, kw = tmp_path / "lat", dict(resolution=RES, batch_size=4, shard_size=4, num_workers=0)
    assert prepare_latents(image_dir, vae_dir, out, **kw)
    (out / PLAN).unlink()
    monkeypatch.setattr(latents, "_encode", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_latents(image_dir, vae_dir, out, resolution=2 * RES, batch_size=4, shard_size=4, num_workers=0)
    assert not (out / MANIFEST).exists() and (out / PLAN).is_file()


@pytest.mark.parametrize("damage, words", [
    ('{"format": ', "is not valid JSON"),
    ("[1, 2]", "is not a JSON object (it holds a list)"),
])
def test_a_damaged_plan_or_manifest_is_one_line_naming_it(tmp_path, vae_dir, image_dir, capsys, damage, words):
    out = tmp_path / "lat"
    argv = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--workers", "0"]
    assert main(argv) == 0
    (out / MANIFEST).write_text(damage)
    run = ["train", LATENT_RECIPE, "--out", str(tmp_path / "run"), "--steps", "1",
           "--set", "data.dataset=latents", "--set", f"data.root={out}", "--set", "data.num_classes=2"]
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert f"the latent manifest {out / MANIFEST} {words}" in err and "prepare-latents command" in err
    assert len(err.splitlines()) == 1
    (out / PLAN).write_text(damage)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the prepare-latents plan {out / PLAN} {words}" in err and len(err.splitlines()) == 1
    (out / PLAN).unlink()  # as the message says: the run starts again, keeping the shards of the same images
    assert main(argv) == 0
    assert "none left to encode" in capsys.readouterr().out


def test_a_plan_another_tool_wrote_and_a_flat_folder_are_named_as_such(tmp_path, vae_dir, image_dir, capsys):
    """An unrelated prepare.json in --out read as "latents prepared with other settings"; a folder of images
    without class folders was told to lay itself out as IMAGE_DIR/CLASS without saying its images were found."""
    out = tmp_path / "lat"
    out.mkdir()
    (out / PLAN).write_text(json.dumps({"name": "my own plan"}))
    argv = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out / PLAN} is not a zoo prepare-latents plan" in err and "move that file out" in err
    assert json.loads((out / PLAN).read_text()) == {"name": "my own plan"}  # the user's file is untouched
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(image_dir.glob("*/*"))[:3]:
        (flat / image.name).write_bytes(image.read_bytes())
    assert main(["prepare-latents", str(flat), "--vae", str(vae_dir), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"{flat} has no class subfolders: its 3 images lie in it" in err and str(flat / "all") in err


def test_a_manifest_without_a_shard_list_is_one_line(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, num_workers=0)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["shards"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no valid shard list"):
        build_dataset({"dataset": "latents", "root": str(out)}, (4, 8, 8), 2)


def test_non_finite_moments_are_refused_naming_the_image_or_the_shard(tmp_path, vae_dir, image_dir, monkeypatch):
    """A shard damaged on disk trained until the loss was NaN, and the error advised a lower lr."""
    from safetensors.torch import save_file

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, shard_size=4, num_workers=0)
    shard = load_file(str(out / shard_name(1)))
    shard["mean"][2, 1, 0, 0, 0] = float("nan")
    save_file(shard, str(out / shard_name(1)), metadata={"format": "zoo-latent-moments"})
    ds = build_dataset({"dataset": "latents", "root": str(out), "random_flip": True}, (4, 8, 8), 2)  # view 1 drawn
    ds[0], ds[5]  # other rows read fine  # noqa: B018
    with pytest.raises(UserError, match=rf"latent shard {out / shard_name(1)} holds NaN or infinite moments \(row 6"
                                        r"|row 2\)"):
        for _ in range(20):  # view 1 of row 6 (shard 1, row 2) is drawn half the time
            ds[6]
    # At encoding: a VAE whose output overflows is named with the image.
    import zoo.latents as latents

    real = latents.encode_moments
    monkeypatch.setattr(latents, "encode_moments", lambda vae, x: tuple(t * float("inf") for t in real(vae, x)))
    with pytest.raises(UserError, match=r"the VAE gave NaN or infinite latents for image .*n01_0\.png"):
        prepare_latents(image_dir, vae_dir, tmp_path / "lat2", resolution=RES, num_workers=0)
    assert not list((tmp_path / "lat2").glob("shard_*"))


def test_a_vae_of_another_shape_than_the_latents_is_refused_for_decoding(tmp_path, vae_dir, image_dir):
    """Latents of a 2x VAE decoded by an 8x one (or vice versa) gave images of the wrong size, exit 0."""
    from zoo.sample import vae_weights

    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, num_workers=0)
    other = _vae_4x(tmp_path / "vae4x")
    recipe = {"data": {"latent": True, "root": str(out)}}
    assert vae_weights(recipe, vae_dir).name == "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match=rf"the VAE .* does not fit the latents in {out} \(downsample 4, not 2: "):
        vae_weights(recipe, other)
    assert vae_weights({"data": {"latent": True, "root": str(tmp_path / "gone")}}, other)  # no manifest: unchecked


def test_a_recipe_pointed_at_the_other_kind_of_data_says_so(tmp_path, vae_dir, image_dir):
    out = tmp_path / "lat"
    prepare_latents(image_dir, vae_dir, out, resolution=RES, num_workers=0)
    with pytest.raises(UserError, match=rf"it is an image folder, and this recipe trains on VAE latents: make them "
                                        rf"with zoo prepare-latents {image_dir} --vae VAE_DIR"):
        build_dataset({"dataset": "latents", "root": str(image_dir)}, (4, 8, 8), 2)
    with pytest.raises(UserError, match="it holds latent shards, and this recipe trains on pixels"):
        build_dataset({"dataset": "image_folder", "root": str(out)}, (3, 16, 16), 2)
    flat = tmp_path / "flat"  # images straight in the root: 'point data.root at a directory with data' was no help
    flat.mkdir()
    for i, source in enumerate(sorted(image_dir.rglob("*.png"))[:2]):
        (flat / f"{i}.png").write_bytes(source.read_bytes())
    with pytest.raises(UserError, match=rf"its images lie in data.root itself: an image folder takes each image's "
                                        rf"label from its subfolder, so move them into one \(e.g. {flat / 'all'}/"):
        build_dataset({"dataset": "image_folder", "root": str(flat)}, (3, 16, 16), 2)


def test_macos_appledouble_files_are_not_images(tmp_path):
    """A tar made on a Mac holds ._NAME beside every image: each stopped a run as an unreadable image."""
    from zoo.training.data import ImageFolder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    assert [p.name for p, _ in ImageFolder(tmp_path, 8).items] == ["x.png"]


def test_a_float_tiff_in_0_1_is_scaled_not_black(tmp_path):
    import numpy as np

    from zoo.training.crop import to_rgb

    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    got = np.asarray(to_rgb(Image.fromarray(values, mode="F")))[..., 0]
    assert got.tolist() == np.rint(values * 255).astype(int).tolist()


def test_a_shard_written_twice_is_the_same_bytes(tmp_path):
    """safetensors writes its metadata in a hash map's order, which changes from one write to the
    next: a resumed run's shards had other bytes than an uninterrupted run's (same tensors)."""
    from zoo.latents import write_shard

    mean, std, labels = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2), torch.tensor([0, 2, 1])
    for name in ("a", "b", "c"):
        write_shard(tmp_path / f"{name}.safetensors", mean, std, labels, 96, torch.float32, ("rows", "settings"))
    data = [(tmp_path / f"{name}.safetensors").read_bytes() for name in ("a", "b", "c")]
    assert data[0] == data[1] == data[2]
    size = int.from_bytes(data[0][:8], "little")
    metadata = json.loads(data[0][8:8 + size])["__metadata__"]
    assert list(metadata) == sorted(metadata) and metadata["start"] == "96"


@pytest.mark.parametrize("change, said", [
    ({"_class_name": "UNet2DConditionModel"}, "config.json is not an AutoencoderKL config (_class_name "
     "UNet2DConditionModel)"),  # SD's unet/ given as --vae: a diffusers ValueError with a traceback
    ({"down_block_types": ["Bogus", "Bogus"]}, "config.json describes no AutoencoderKL diffusers can build: "
     "Bogus does not exist"),
])
def test_a_folder_that_is_no_vae_is_one_line(tmp_path, vae_dir, image_dir, capsys, change, said):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(vae_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["prepare-latents", str(image_dir), "--vae", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoo: error: {other / 'config.json'}") and said in err and err.count("\n") == 1


def test_a_second_run_into_the_same_out_is_refused_and_the_ranks_of_one_run_are_not(tmp_path, vae_dir, image_dir):
    """Two runs into one --out removed each other's temporary shard files (each took them for a killed run's);
    the ranks of one torchrun run write disjoint shards and must not refuse each other."""
    import subprocess
    import sys

    from zoo.latents import LOCK

    out = tmp_path / "lat"
    kw = dict(resolution=RES, batch_size=4, shard_size=3, num_workers=0)  # 4 shards
    out.mkdir()
    holder = subprocess.Popen(  # rank 0 of 2 of another run, writing shards 0 and 2
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "[fcntl.lockf(fd, fcntl.LOCK_EX, 1, k) for k in (0, 2)]; print('ready', flush=True); sys.stdin.read()",
         str(out / LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        assert prepare_latents(image_dir, vae_dir, out, rank=1, world=2, **kw) is False  # its own run's rank 1
        live = out / f".{shard_name(0)}.tmp-0123abcd"  # the other run's write in progress
        live.write_bytes(b"half a shard")
        with pytest.raises(UserError, match=f"another zoo prepare-latents is writing {re.escape(str(out))}") as err:
            prepare_latents(image_dir, vae_dir, out, **kw)
        assert err.value.suggestion == "wait for it to end, or choose another --out"
        assert live.exists() and not (out / shard_name(0)).exists()
    finally:
        holder.communicate("")
    live.unlink()
    assert prepare_latents(image_dir, vae_dir, out, **kw) is True  # the locks went with the process


def test_the_done_line_quotes_the_out_for_the_shell(tmp_path, vae_dir, image_dir, capsys):
    out = tmp_path / "lat ü"
    assert main(["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution",
                 str(RES), "--workers", "0"]) == 0
    assert f"done; train with --set 'data.root={out}'\n" in capsys.readouterr().out


def test_files_of_other_suffixes_are_named_in_a_note(tmp_path, vae_dir, image_dir, capsys):
    """A GIF beside the images was skipped unsaid: the run's image count was all that showed it."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    Image.new("RGB", (8, 8)).save(images / "n01" / "extra.gif")
    args = ["prepare-latents", str(images), "--vae", str(vae_dir), "--out", str(tmp_path / "lat"), "--resolution",
            str(RES), "--workers", "0"]
    assert main(args) == 0
    assert (f"zoo prepare-latents: note: 1 file with other suffixes in the class folders is not read (e.g. "
            f"{images / 'n01' / 'extra.gif'})") in capsys.readouterr().out


def test_an_output_started_before_todays_image_reading_is_named(tmp_path, vae_dir, image_dir, capsys):
    """Shards encoded when transparency, 16-bit PGMs and float TIFFs were read another way were resumed and
    trained on without a word; the plan now records the image reading, and an older plan gets a note."""
    out = tmp_path / "lat"
    args = ["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--resolution", str(RES),
            "--workers", "0"]
    assert main(args) == 0
    plan = json.loads((out / PLAN).read_text())
    assert plan["image_decoding"] == 2
    assert "read images another way" not in capsys.readouterr().out
    del plan["image_decoding"]  # as a zoo before the record wrote it
    (out / PLAN).write_text(json.dumps(plan))
    assert main(args) == 0
    assert f"note: {out} was started by a zoo that read images another way" in capsys.readouterr().out

    # another image list rewrites the plan and keeps the shards of unchanged rows: still the older reading
    folder = tmp_path / "more"
    shutil.copytree(image_dir, folder)
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "n02" / "n02_9.png")
    assert main(["prepare-latents", str(folder), *args[2:]]) == 2  # another folder: refused, nothing rewritten
    capsys.readouterr()
    plan["root"] = str(folder.resolve())  # as after the user's move of the folder
    (out / PLAN).write_text(json.dumps(plan))
    assert main(["prepare-latents", str(folder), *args[2:]]) == 0
    printed = capsys.readouterr().out
    assert "the images under" in printed and "changed since" in printed  # the list changed: shards kept
    assert f"note: {out} was started by a zoo that read images another way" in printed
    assert json.loads((out / PLAN).read_text())["image_decoding"] == 1
    assert json.loads((out / MANIFEST).read_text())["image_decoding"] == 1


def test_no_more_workers_are_started_than_there_are_batches_to_read(tmp_path, vae_dir, image_dir, capsys,
                                                                    monkeypatch):
    """--workers 200 on ten images forked two hundred decoding processes for two batches."""
    import torch.utils.data

    started = []

    class Loader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            started.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    assert main(["prepare-latents", str(image_dir), "--vae", str(vae_dir), "--out", str(tmp_path / "lat"),
                 "--resolution", str(RES), "--batch-size", "5", "--workers", "200", "--device", "cpu"]) == 0
    assert started == [2]
    assert "zoo prepare-latents: note: 2 batches of images to read, so 2 workers of the --workers 200\n" in \
        capsys.readouterr().out
