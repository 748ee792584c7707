"""``zoo export npz``: zoo eval's sample shards as the ADM evaluator's sample batch (arr_0, arr_1)."""

import json
import zipfile
from pathlib import Path

import numpy as np

from zoo.cli import main
from zoo.eval.adm_npz import export_adm_npz
from zoo.eval.reference import save_npz


def _shards(directory, ranges, labelled=True, size=4, seed=0):
    """Shards as zoo eval writes them: images N x H x W x 3 uint8, labels, indices; sample i is the same
    image in every shard that holds it."""
    rng = np.random.default_rng(seed)
    n = max(stop for _, stop in ranges)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    for start, stop in ranges:
        extra = {"labels": labels[start:stop]} if labelled else {}
        save_npz(directory / f"shard-{start:07d}-{stop:07d}.npz", images=images[start:stop],
                 indices=np.arange(start, stop), **extra)
    return images, labels


def test_the_batch_holds_the_samples_in_index_order(tmp_path):
    samples = tmp_path / "run" / "eval" / "samples-last-abc"
    samples.mkdir(parents=True)
    # two evals of different batch sizes left overlapping shards; a later shard past a gap is not reached
    images, labels = _shards(samples, [(0, 3), (3, 6), (0, 4), (6, 7), (9, 10)])
    out, n, shape, labelled = export_adm_npz(tmp_path / "run", tmp_path / "batch.npz")  # found via RUN/eval
    assert (n, shape, labelled) == (7, (4, 4, 3), True)
    with np.load(out, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["arr_0"], images[:7])
        np.testing.assert_array_equal(f["arr_1"], labels[:7])
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].dtype == np.int64
    with zipfile.ZipFile(out) as archive:  # the evaluator reads arr_0.npy straight out of the archive
        assert archive.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
    _, n, _, _ = export_adm_npz(samples, tmp_path / "five.npz", n=5)
    np.testing.assert_array_equal(np.load(tmp_path / "five.npz")["arr_0"], images[:5])


def test_the_source_may_be_what_zoo_eval_was_given(tmp_path):
    """A checkpoint outside a run evaluates into CKPT-eval beside it: the same CKPT finds its samples."""
    from zoo.checkpoint import EMA
    from zoo.eval.extractors import sha256_file

    ckpt = tmp_path / "dit_tiny"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / EMA).write_bytes(b"weights")
    samples = tmp_path / "dit_tiny-eval" / "samples-dit_tiny-abc"
    samples.mkdir(parents=True)
    images, _ = _shards(samples, [(0, 2)])
    result = {"protocol": {"weights": "ema", "weights_sha256": sha256_file(ckpt / EMA)}, "samples": str(samples)}
    (samples.parent / "dit_tiny-pool-n2-abc-ref123456.json").write_text(json.dumps(result))
    export_adm_npz(ckpt, tmp_path / "b.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["arr_0"], images)


def test_unlabelled_samples_have_no_arr_1(tmp_path):
    _shards(tmp_path, [(0, 2)], labelled=False)
    export_adm_npz(tmp_path, tmp_path.parent / "u.npz")
    assert "arr_1" not in np.load(tmp_path.parent / "u.npz").files


def test_mistakes_are_one_line_and_no_file_is_replaced(tmp_path, capsys):
    run = tmp_path / "run"
    for name in ("samples-last-a", "samples-last-b"):
        (run / "eval" / name).mkdir(parents=True)
        _shards(run / "eval" / name, [(0, 2)])
    user_file = tmp_path / "VIRTUAL_ref.npz"
    np.savez(user_file, arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    cases = [
        ([str(run), "--out", str(tmp_path / "x.npz")], "holds samples of 2 protocols (samples-last-a, samples-last-b)"),
        ([str(run / "eval" / "samples-last-a"), "--out", str(tmp_path / "x.npz"), "--n", "3"],
         "holds samples 0..1, not the 3 asked for"),
        ([str(tmp_path), "--out", str(tmp_path / "x.npz")], "holds no zoo eval samples"),
        ([str(run / "eval" / "samples-last-a"), "--out", str(tmp_path / "x.png")], "the sample batch is an .npz file"),
        ([str(run / "eval" / "samples-last-a"), "--out", str(user_file)], f"--out {user_file} exists"),
        ([str(run / "eval" / "samples-last-a"), "--out", str(tmp_path / "x.npz"), "--weights", "model"],
         "--weights is an option of zoo export diffusers, not of npz"),  # it was accepted and ignored
        ([str(run / "eval" / "samples-last-a"), "--out", str(user_file), "--force"],
         "is not a sample batch zoo export wrote"),
        ([str(run / "eval" / "samples-last-a"), "--out", str(user_file / "s.npz")],  # a FileExistsError traceback
         f"--out {user_file / 's.npz'}: {user_file} is a file, not a directory"),
    ]
    for argv, words in cases:
        assert main(["export", "npz", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert np.load(user_file)["arr_0"].shape == (1, 2, 2, 3)  # the user's file is untouched
    first = tmp_path / "mine.npz"
    assert main(["export", "npz", str(run / "eval" / "samples-last-a"), "--out", str(first)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", "npz", str(run / "eval" / "samples-last-b"), "--out", str(first), "--force"]) == 0
    assert not list(tmp_path.glob(".mine.npz.tmp-*"))


def test_the_export_reads_back_as_a_reference_batch(tmp_path, isolated_eval):
    """What zoo exports, zoo (like the ADM evaluator) reads as an arr_0/arr_1 batch."""
    import torch

    from zoo.eval.extractors import Extractor
    from zoo.eval.reference import load_reference

    class MeanRGB(Extractor):
        name = "mean_rgb"

        def forward(self, images):
            return images.float().mean((2, 3)), None

    images, labels = _shards(tmp_path, [(0, 6)], size=8)
    export_adm_npz(tmp_path, tmp_path / "out" / "batch.npz")
    ref = load_reference(str(tmp_path / "out" / "batch.npz"), MeanRGB(), 8, batch_size=4, log=lambda _: None)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float().mean((2, 3)).double().numpy()
    np.testing.assert_allclose(ref.features, expected, rtol=1e-6)  # features are stored as float32
    np.testing.assert_array_equal(ref.labels, labels)


def test_a_reference_batch_of_another_resolution_is_said(tmp_path, isolated_eval):
    """An 8-px arr_0 scored against 16-px samples gave an FD that also measures the resolution, silently."""
    from zoo.eval.extractors import Extractor
    from zoo.eval.reference import load_reference

    class MeanRGB(Extractor):
        name = "mean_rgb"

        def forward(self, images):
            return images.float().mean((2, 3)), None

    _shards(tmp_path, [(0, 4)], size=8)
    export_adm_npz(tmp_path, tmp_path / "batch.npz")
    for size, expected in ((8, []), (16, ["zoo eval: warning: the reference's images are 8x8, the samples 16x16:"])):
        lines = []
        load_reference(str(tmp_path / "batch.npz"), MeanRGB(), size, log=lines.append)
        assert [line[:len(expected[0])] for line in lines if "warning" in line] == expected


def test_out_and_source_given_with_a_tilde_are_under_home(tmp_path, monkeypatch, capsys):
    """bash leaves `--out=~/s.npz` as it is: it was written to ./~/s.npz."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "samples-last-a", [(0, 2)])
    assert main(["export", "npz", "~/samples-last-a", "--out=~/s.npz"]) == 0
    assert (tmp_path / "s.npz").is_file() and not (tmp_path / "~").exists()


def test_a_checkpoint_exports_only_samples_of_its_current_weights(tmp_path, capsys, isolated_eval, one_thread,
                                                                    register_extractor):
    """zoo export npz RUN/step_0000010 exported last/'s samples (a glob of RUN/eval/samples-*), and after a
    resume RUN exported the samples of last/'s earlier weights: the results' weights hash now picks them."""
    import zoo
    from pool_extractors import Pool4
    from zoo.training import train

    register_extractor("test_pool4", Pool4)
    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    run, ev = tmp_path / "run", ["--n", "4", "--ref", "synthetic", "--extractor", "test_pool4", "--device", "cpu"]
    train(zoo.load_recipe(recipe), run, steps=20, log=lambda *_: None)  # step_0000010, step_0000020, last
    assert main(["eval", str(run), *ev]) == 0
    (last_samples,) = (run / "eval").glob("samples-last-*")
    capsys.readouterr()
    assert main(["export", "npz", str(run / "step_0000010"), "--out", str(tmp_path / "s10.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no zoo eval samples of its current weights" in err
    assert "run zoo eval" in err and not (tmp_path / "s10.npz").exists()
    assert main(["export", "npz", str(run), "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["zoo_export"] == str(last_samples)

    train(zoo.load_recipe(recipe), run, steps=22, resume=run, log=lambda *_: None)  # last/ holds other weights
    capsys.readouterr()
    assert main(["export", "npz", str(run), "--out", str(tmp_path / "stale.npz")]) == 2
    assert "an earlier save" in capsys.readouterr().err and not (tmp_path / "stale.npz").exists()
    assert main(["eval", str(run), *ev]) == 0
    (new,) = set((run / "eval").glob("samples-last-*")) - {last_samples}
    assert main(["export", "npz", str(run), "--out", str(tmp_path / "new.npz")]) == 0
    assert np.load(tmp_path / "new.npz")["zoo_export"] == str(new)
    assert main(["eval", str(run), *ev, "--steps", "3"]) == 0  # two protocols of these weights: name one
    capsys.readouterr()
    assert main(["export", "npz", str(run), "--out", str(tmp_path / "two.npz")]) == 2
    assert "holds samples of 2 protocols" in capsys.readouterr().err
