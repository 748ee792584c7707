"""Pins on zoo prepare-latents, the ``latents`` dataset and the ADM ``.npz`` export that no other test
held (each fails on a mutation the rest of the suite let pass): the non-finite check in the stored
dtype and on the std, the refusals of a resolution the VAE does not divide, of a decoder with another
latent channel count and of zero sizes, the CLI's defaults and rank 0's lone progress bar, the
latents dataset's unflipped default and per-row labels, its class names from the manifest, and the
export's count over overlapping or gapped eval shards, its refusal of --n 0 and its atomic write.
Built from hand-written shards and a stand-in VAE: no diffusers model, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

C, H = 2, 2  # latent channels and side of the hand-written shards


def _prepared(root: Path, n: int = 5, shard_size: int = 2, classes=("a", "b"), vae: dict | None = None) -> Path:
    """A finished ``zoo prepare-latents`` output written by hand: row i's view v has mean i + 10·v
    and std 0.5 + v (so the two views differ in both), labels i % 2."""
    from zoo.latents import FORMAT, MANIFEST, shard_name, write_shard

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        rows = range(start, min(start + shard_size, n))
        mean = torch.stack([torch.stack([torch.full((C, H, H), i + 10.0 * v) for v in (0, 1)]) for i in rows])
        std = torch.stack([torch.stack([torch.full((C, H, H), 0.5 + v) for v in (0, 1)]) for _ in rows])
        labels = torch.tensor([i % 2 for i in rows])
        write_shard(root / shard_name(k), mean, std, labels, start, torch.float32, ("rows", "settings"))
        shards.append({"file": shard_name(k), "start": start, "num_images": len(rows)})
    manifest = {"format": FORMAT, "version": 2, "num_images": n, "resolution": 16, "classes": list(classes),
                "num_classes": len(classes), "shards": shards}
    if vae is not None:
        manifest["vae"] = vae
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


# --- zoo prepare-latents: the non-finite check ---------------------------------------------------


def test_moments_that_overflow_the_stored_dtype_are_refused():
    """Finite float32 moments past float16's range are stored as inf with --dtype float16: a check on
    the float32 values let them through, and training stopped later on a non-finite loss."""
    from zoo.latents import _check_finite

    mean, std = torch.ones(2, 2, C, H, H), torch.ones(2, 2, C, H, H)
    mean[1, 0, 0, 0, 0] = 1e5  # finite in float32 and bfloat16, inf in float16
    paths = [Path("a.png"), Path("b.png")]
    _check_finite(mean, std, torch.float32, paths)
    with pytest.raises(UserError, match=r"NaN or infinite latents for image b\.png \(stored as float16\)"):
        _check_finite(mean, std, torch.float16, paths)


def test_a_non_finite_std_is_refused_like_a_non_finite_mean():
    """z = mean + std·ε: an infinite std alone gives a non-finite latent as surely as the mean does;
    a check on the mean only stored it."""
    from zoo.latents import _check_finite

    mean, std = torch.zeros(3, 2, C, H, H), torch.ones(3, 2, C, H, H)
    std[2, 1, 1, 1, 1] = float("inf")
    with pytest.raises(UserError, match=r"NaN or infinite latents for image c\.png"):
        _check_finite(mean, std, torch.float32, [Path("a.png"), Path("b.png"), Path("c.png")])


def test_a_shard_write_that_fails_half_way_leaves_no_shard(tmp_path, monkeypatch):
    """An interrupted run leaves only whole shards (zoo.latents' promise): a shard written in place left a
    truncated file under the final name, for a resume, a copy or anything else reading OUT to judge."""
    import zoo.weights
    from zoo.latents import shard_name, write_shard

    def half_then_killed(path, tensors, meta):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.weights, "save_reproducibly", half_then_killed)
    path = tmp_path / shard_name(0)
    with pytest.raises(KeyboardInterrupt):
        write_shard(path, torch.zeros(1, 2, C, H, H), torch.ones(1, 2, C, H, H), torch.zeros(1), 0, torch.float32,
                    ("rows", "settings"))
    assert list(tmp_path.iterdir()) == []


def test_a_resolution_the_vae_does_not_divide_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """--resolution 12 with an f8 VAE encoded 1x1 latents of the top-left 8 pixels' worth and a manifest
    that says 12: a model trained on them samples images of another size than the recipe names."""
    from PIL import Image

    import zoo.latents as latents

    (tmp_path / "images" / "c").mkdir(parents=True)
    Image.new("RGB", (12, 12), (10, 20, 30)).save(tmp_path / "images" / "c" / "a.png")

    class PoolVAE(torch.nn.Module):  # an f8 "VAE": 8x8 average pooling, std 1
        def encode(self, x):
            mean = torch.nn.functional.avg_pool2d(x, 8)
            return type("E", (), {"latent_dist": type("D", (), {"mean": mean, "std": torch.ones_like(mean)})})

    identity = {"weights": "w", "sha256": "0" * 64, "scaling_factor": 0.18215, "shift_factor": 0.0,
                "latent_channels": 3, "downsample": 8}
    monkeypatch.setattr(latents, "load_encoder", lambda vae_dir: (PoolVAE(), dict(identity)))
    out = tmp_path / "lat"
    with pytest.raises(UserError, match="--resolution 12 is not a multiple of the VAE's downsampling 8"):
        latents.prepare_latents(tmp_path / "images", "vae", out, resolution=12, num_workers=0)
    assert not out.exists()
    assert latents.prepare_latents(tmp_path / "images", "vae", out, resolution=16, num_workers=0)  # 16 is


def test_a_decoder_of_another_latent_channel_count_is_refused(tmp_path):
    """Latents of a 4-channel VAE decoded by a 16-channel one (an SD3-style VAE of the same f8) failed deep
    in the decoder or, worse, decoded; another VAE of the same shape (ft-EMA for ft-MSE) is fine."""
    from zoo.latents import check_decoder_fits

    out = _prepared(tmp_path / "lat", vae={"weights": "w", "downsample": 2, "latent_channels": 4})

    def vae(name, channels):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8, 16],
                                                        "latent_channels": channels}))
        weights = folder / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(b"")  # not read: the shape comes from the config
        return weights

    check_decoder_fits(vae("same", 4), {"root": str(out)})
    with pytest.raises(UserError, match=r"does not fit the latents in .*\(latent_channels 16, not 4: "):
        check_decoder_fits(vae("wide", 16), {"root": str(out)})


def test_prepare_latents_defaults_are_the_documented_ones(monkeypatch):
    """256 px (the paper recipes' ImageNet 256), shards of 10000, float32 moments, batches of 32, and
    decoding workers up to 8 of the CPUs this process may use: another default made latents a paper
    recipe refuses, or a 64-core node forked 64 decoders per GPU process."""
    import zoo.commands.prepare_latents as command
    from zoo.cli import build_parser

    argv = ["prepare-latents", "IMAGES", "--vae", "VAE", "--out", "OUT"]
    for cpus, workers in ((64, 8), (3, 3)):
        monkeypatch.setattr(command, "usable_cpus", lambda: cpus)
        args = build_parser().parse_args(argv)
        assert (args.resolution, args.shard_size, args.batch_size, args.dtype, args.workers, args.device) == (
            256, 10000, 32, "float32", workers, None)


@pytest.mark.parametrize("flag", ["--resolution", "--batch-size", "--shard-size"])
def test_a_zero_size_is_one_line_before_anything_is_read(tmp_path, capsys, flag):
    """Unchecked, --shard-size 0 divided by zero planning the shards and --batch-size 0 was a range() step
    of 0 (tracebacks after the VAE was loaded), --resolution 0 a crop to nothing: each is refused first."""
    from zoo.cli import main

    out = tmp_path / "lat"
    argv = ["prepare-latents", str(tmp_path / "images"), "--vae", str(tmp_path / "vae"), "--out", str(out)]
    assert main(argv + [flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be at least 1, got 0" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_under_torchrun_only_rank_0_draws_a_progress_bar(tmp_path, monkeypatch):
    """Every rank drawing its bar interleaved 8 bars into one garbled line per refresh on an 8-GPU node."""
    import zoo.latents
    from zoo.cli import main

    seen = {}
    monkeypatch.setattr(zoo.latents, "prepare_latents", lambda *a, rank, progress, **k: seen.setdefault(rank, progress))
    argv = ["prepare-latents", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "lat"), "--device", "cpu"]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(argv) == 0
    assert seen[0] is not None and seen[1] is None


# --- the latents dataset -------------------------------------------------------------------------


def test_latents_by_default_draw_the_image_at_sds_scale_with_its_own_label(tmp_path):
    """Unset, data.random_flip is false (the trainer's default) and data.vae_scale is SD's 0.18215: a
    dataset that flipped by default mirrored data that must not be, and another default scale trained
    on latents of another variance than the recipe's sampler decodes. A label read one row off trained
    each class on its neighbour's images (a conditional model that still looks fine unconditionally)."""
    from zoo.training.data import build_dataset

    out = _prepared(tmp_path / "lat")  # a manifest without a VAE record: nothing to check the scale against
    ds = build_dataset({"dataset": "latents", "root": str(out)}, (C, H, H), 2)
    assert ds.flip is False and ds.vae_scale == pytest.approx(0.18215, rel=0, abs=0)
    for key in range(8):  # either view drawn with a flip; view 0 always here
        gen = torch.Generator().manual_seed(key)
        torch.randint(2, (), generator=gen)
        noise = torch.randn(C, H, H, generator=gen)
        z, y = ds[(3, key)]
        torch.testing.assert_close(z, (3.0 + 0.5 * noise) * 0.18215, rtol=0, atol=0)
        assert y == 1
    assert [ds[(i, 0)][1] for i in range(5)] == [0, 1, 0, 1, 0]  # each row its own label, across the shards


def test_the_latents_class_names_are_the_manifests(tmp_path):
    """The classes of prepared latents are their manifest's (the sorted class folders they were made from):
    an empty list left a run's checkpoints without their labels' meaning, so `zoo sample --class
    n01440764` could not resolve the name."""
    from zoo.training.datasets import imagenet, latents

    out = _prepared(tmp_path / "lat", classes=("n01440764", "n01443537"))
    assert latents.class_names({"root": str(out)}) == ["n01440764", "n01443537"]
    assert imagenet.class_names({"root": str(out), "latent": True}) == ["n01440764", "n01443537"]
    assert latents.class_names({"root": str(tmp_path / "none")}) == []


# --- the ADM .npz export -------------------------------------------------------------------------


def _eval_shards(directory: Path, ranges, size: int = 2):
    """zoo eval sample shards over ``ranges``; sample i is the same image in every shard holding it."""
    from zoo.eval.reference import save_npz

    directory.mkdir(parents=True, exist_ok=True)
    n = max(stop for _, stop in ranges)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for start, stop in ranges:
        save_npz(directory / f"shard-{start:07d}-{stop:07d}.npz", images=images[start:stop],
                 indices=np.arange(start, stop), labels=np.arange(start, stop) % 3)
    return images


def test_the_export_counts_samples_across_shards_of_two_evals_with_other_batches(tmp_path):
    """An eval of 7 at batch 6 and one of 8 at batch 4 leave shards 0-4, 0-6, 4-8, 6-7 (sorted by start):
    samples 0..7 are all there; a count that took the last shard's stop said 7 and dropped sample 7."""
    from zoo.eval.adm_npz import contiguous_count, export_adm_npz

    samples = tmp_path / "samples-last-x"
    images = _eval_shards(samples, [(0, 6), (6, 7), (0, 4), (4, 8)])
    assert contiguous_count(samples) == 8
    _, n, _, _ = export_adm_npz(samples, tmp_path / "b.npz")
    assert n == 8
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["arr_0"], images)


def test_the_export_stops_at_a_gap_of_one_sample(tmp_path):
    """Samples 0..2 and 4..5 lack sample 3: the batch is 0..2, not 0..5 with a hole in it."""
    from zoo.eval.adm_npz import contiguous_count

    samples = tmp_path / "samples-last-x"
    _eval_shards(samples, [(0, 3), (4, 6)])
    assert contiguous_count(samples) == 3


def test_an_export_of_no_samples_is_refused(tmp_path):
    """--n 0 wrote an empty arr_0 that the ADM evaluator then failed on (or averaged to NaN) far from here."""
    from zoo.eval.adm_npz import export_adm_npz

    samples = tmp_path / "samples-last-x"
    _eval_shards(samples, [(0, 2)])
    with pytest.raises(UserError, match="--n must be at least 1, got 0"):
        export_adm_npz(samples, tmp_path / "b.npz", n=0)
    assert not (tmp_path / "b.npz").exists()


def test_an_interrupted_export_leaves_no_partial_batch(tmp_path, monkeypatch):
    """50k samples take minutes to write: a run stopped half-way must not leave a truncated .npz under
    the final name (the evaluator reads it, or --force refuses it as not zoo's)."""
    import zoo.eval.adm_npz as adm_npz

    samples = tmp_path / "samples-last-x"
    _eval_shards(samples, [(0, 2), (2, 4)])
    real = adm_npz.sample_batches

    def batches(directory, n, batch):
        if batch == 1:  # the first image, read for the shape
            yield from real(directory, n, batch)
            return
        it = real(directory, n, 2)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(adm_npz, "sample_batches", batches)
    with pytest.raises(KeyboardInterrupt):
        adm_npz.export_adm_npz(samples, tmp_path / "b.npz")
    assert not (tmp_path / "b.npz").exists() and not list(tmp_path.glob(".b.npz.tmp-*"))
