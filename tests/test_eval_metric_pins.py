"""Pins of zoo.eval metric and reference-cache details that mutation testing found the rest of the suite let through.

* ``precision_recall`` returns (precision, recall) in that order;
* the Inception Score defaults to ``len(logits) // 2`` splits (two samples a split) when fewer than asked fit;
* class names are compared in order: a reference whose label 0 is "dogs" is not a model whose label 0 is "cats";
* ``frechet_distance`` symmetrises an input covariance, so FD(mu, S) = FD(mu, S.T);
* cached reference statistics are keyed by everything that made them: the extractor's weights (not only its
  name), a dataset's image size, the run's own data's seed, a folder's file times and an .npz's time;
* cached labels come back from the cache.

Every expected value is derived by hand (comments say how) or from an independent computation (a fresh cache),
never copied from the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import zoo
from zoo.eval.metrics import Features, Reference, compute_metrics, inception_score, precision_recall
from zoo.eval.reference import load_reference
from zoo.eval.stats import feature_statistics, frechet_distance

from pool_extractors import Pool4

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes, synthetic data


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread):
    pass


def _quiet(_line: str) -> None:
    pass


def _load(spec, extractor, image_size, **kwargs):
    """load_reference, returning (reference, whether it computed the features rather than reading the cache)."""
    said = []
    ref = load_reference(str(spec), extractor, image_size, log=said.append, **kwargs)
    return ref, any("computing reference features" in line for line in said)


def _fresh(monkeypatch, tmp_path, name, spec, extractor, image_size, **kwargs):
    """The reference computed from nothing, in a cache of its own (the independent value)."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / name))
    ref, computed = _load(spec, extractor, image_size, **kwargs)
    assert computed
    return ref


def _assert_same(a: Reference, b: Reference) -> None:
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.mu, b.mu)
    np.testing.assert_array_equal(a.sigma, b.sigma)


# --------------------------------------------------------------------------- metrics


def test_precision_and_recall_are_returned_in_that_order():
    """Mutation: ``return recall, precision``. Real features are two far-apart clusters A and B (20 points
    each); the generated ones are cluster A itself. Every generated sample lies on the real manifold
    (precision 1), only the real samples of A lie on the generated one (recall 20/40 = 1/2). Both are
    fractions of whole counts, exact in float32."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 10.0
    real = np.concatenate([a, b])
    assert precision_recall(a, real) == (1.0, 0.5)
    out = compute_metrics(Features(a), Reference(*feature_statistics(real), real))
    assert (out["precision"], out["recall"]) == (1.0, 0.5)
    # and the other way round: generated = A and B, real = A: precision 1/2, recall 1
    assert precision_recall(real, a) == (0.5, 1.0)


def test_inception_score_takes_two_samples_a_split_when_fewer_than_asked_fit():
    """Mutation: ``len(logits) // 2`` -> ``// 3`` splits. Logits that are confident (+50 against -50) in a
    different class for every sample: a split of m samples has the uniform marginal over its m classes and
    each prediction is one-hot, so its IS is exp(log m) = m, whatever torch-fidelity's shuffle puts where.
    N = 8, 10 splits asked: 4 splits of 2 -> IS 2, 2, 2, 2 (mean 2, std 0); 3 per split would be 2 splits of 4
    (IS 4). N = 9: 4 splits at rows 0, 2, 4, 6, 9 (i * 9 // 4) -> IS 2, 2, 2, 3: mean 2.25, population std
    sqrt((3 * 0.25**2 + 0.75**2) / 4) = sqrt(0.1875); 3 splits would be 3, 3, 3. exp(-100) ~ 4e-44 of the
    off-classes' softmax leaves the IS exact to ~1e-42 (float64 arithmetic after the float32 cast of +-50)."""
    for n, (mean, std) in ((8, (2.0, 0.0)), (9, (2.25, np.sqrt(0.1875)))):
        logits = np.full((n, n), -50.0)
        np.fill_diagonal(logits, 50.0)
        got = inception_score(logits)
        assert got[0] == pytest.approx(mean, rel=1e-12) and got[1] == pytest.approx(std, rel=1e-12, abs=1e-12)
        assert got == inception_score(logits, splits=4)
    eight = np.full((8, 8), -50.0)
    np.fill_diagonal(eight, 50.0)
    assert inception_score(eight, splits=2)[0] == pytest.approx(4.0, rel=1e-12)  # what // 3 gave
    out = compute_metrics(Features(np.eye(8), logits=eight), Reference(np.zeros(8), np.eye(8)))
    assert out["is_mean"] == pytest.approx(2.0, rel=1e-12) and out["is_std"] == pytest.approx(0.0, abs=1e-12)


def test_class_names_in_another_order_are_other_classes():
    """Mutation: the class names compared sorted. A reference of class folders dogs/, cats/ listed as
    ["dogs", "cats"] has label 0 = dogs; a model trained with ["cats", "dogs"] has label 0 = cats: the same
    names, other classes, so no per-class FD, and the note names label 0 on each side."""
    rng = np.random.default_rng(6)
    ref, labels = rng.normal(size=(40, 3)), np.arange(40) % 2
    reference = Reference(*feature_statistics(ref), ref, labels, classes=["dogs", "cats"])
    out = compute_metrics(Features(ref, labels=labels), reference, num_classes=2, class_names=["cats", "dogs"])
    assert "per_class_fd" not in out and "per_class_fd_mean" not in out
    assert out["per_class_fd_skipped"] == ("the reference's classes are not those the model was trained with (2 "
                                           "against 2; label 0 is 'dogs' there and 'cats' here)")
    same = compute_metrics(Features(ref, labels=labels), reference, num_classes=2, class_names=["dogs", "cats"])
    assert set(same["per_class_fd"]) == {"0", "1"}


def test_fd_symmetrises_a_slightly_asymmetric_input_covariance():
    """Mutation: ``_as_stats`` returns sigma as given, not (sigma + sigma.T) / 2. A covariance from a file
    written by other software can be asymmetric in its last bits or more; eigh reads one triangle only, so
    FD(mu, S) and FD(mu, S.T) differed. Both must be the FD of the symmetric part (S + S.T) / 2, computed
    here from that symmetric matrix (exact in float64: halving a sum is exact up to one rounding, and
    (S + S.T) / 2 and (S.T + S) / 2 are the same bits). The asymmetry is 1e-8 of the entries (more than 1e-6
    of the largest is no covariance, refused): the mutation moves the FD by ~1e-8, far beyond the 1e-12
    relative tolerance (float64 rounding of the same operations)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 5))
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(rng.normal(size=(60, 5)) * 1.5 + 0.2)
    skew = rng.normal(size=(5, 5)) * 1e-8
    asym = s1 + (skew - skew.T)  # symmetric part s1, antisymmetric part 1e-8
    assert not np.allclose(asym, asym.T, rtol=0, atol=1e-9)
    want = frechet_distance(mu1, (asym + asym.T) / 2.0, mu2, s2)
    assert want == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-12)
    for sigma in (asym, asym.T):
        assert frechet_distance(mu1, sigma, mu2, s2) == pytest.approx(want, rel=1e-12)
        assert frechet_distance(mu2, s2, mu1, sigma) == pytest.approx(want, rel=1e-12)  # FD is symmetric


# --------------------------------------------------------------------------- the reference cache


class _WeightsA(Pool4):
    """Pool4 under the name test_pool4 with made-up weights A."""

    weights_file, weights_sha256 = "a.pth", "a" * 64


class _WeightsB(Pool4):
    """The same name, other weights B: features twice A's."""

    weights_file, weights_sha256 = "b.pth", "b" * 64

    def forward(self, images):
        features, _ = super().forward(images)
        return features * 2.0, None


def _class_folder(root: Path, seed: int = 5, suffix: str = ".bmp") -> Path:
    """root/cats, root/dogs with 3 random 8x8 images each (BMP: a file's size is fixed by its shape)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}{suffix}")
    return root


def test_extractors_of_one_name_and_other_weights_do_not_share_cached_statistics(tmp_path, monkeypatch):
    """Mutation: the cache key holds ``extractor.name``, not ``extractor.describe()`` (name and weights).
    Extractor B has A's name and other weights (its features are twice A's): after A's statistics are
    cached, B's must be B's own, computed (not read from A's entry), equal to B's in a cache of its own."""
    assert _WeightsA.name == _WeightsB.name
    ref = _class_folder(tmp_path / "ref")
    first, computed = _load(ref, _WeightsA(), 8)
    assert computed
    second, computed = _load(ref, _WeightsB(), 8)
    assert computed, "B's statistics were read from A's cache entry"
    np.testing.assert_array_equal(second.features, first.features * 2)  # (x2 is exact in float32)
    again, computed = _load(ref, _WeightsA(), 8)  # and A's entry is still A's
    assert not computed
    _assert_same(again, first)
    _assert_same(second, _fresh(monkeypatch, tmp_path, "fresh", ref, _WeightsB(), 8))


def test_a_dataset_reference_at_another_image_size_is_another_reference(tmp_path, monkeypatch):
    """Mutation: the dataset key drops ``:{image_size}``. ``--ref synthetic`` of the run's own data (its recipe
    fixes data.image_size: 8, the same in both keys) made at 16 px after 8 px: its images are the
    synthetic patterns upsampled to 16, whose 4x4-pooled features differ from those at 8 px; they must be
    computed at 16, equal to the 16 px reference of a cache of its own."""
    recipe = zoo.load_recipe(RECIPE, ["data.size=16"])
    at8, computed = _load("synthetic", Pool4(), 8, recipe=recipe)
    assert computed
    at16, computed = _load("synthetic", Pool4(), 16, recipe=recipe)
    assert computed, "the 16 px reference was read from the 8 px one's cache entry"
    fresh16 = _fresh(monkeypatch, tmp_path, "fresh", "synthetic", Pool4(), 16, recipe=recipe)
    _assert_same(at16, fresh16)
    assert not np.allclose(fresh16.features, at8.features)


def test_the_runs_own_data_of_another_seed_is_another_reference(tmp_path, monkeypatch):
    """Mutation: the key of the run's own data leaves out ``train.seed``, which seeds its synthetic images
    (``build(data, shape, classes, seed)``): two recipes that differ only in the seed train on other images,
    so ``--ref synthetic`` of the second must be its own images' statistics, not the first's."""
    seed0 = zoo.load_recipe(RECIPE, ["data.size=16", "train.seed=0"])
    seed1 = zoo.load_recipe(RECIPE, ["data.size=16", "train.seed=1"])
    first, computed = _load("synthetic", Pool4(), 8, recipe=seed0)
    assert computed
    second, computed = _load("synthetic", Pool4(), 8, recipe=seed1)
    assert computed, "seed 1's reference was read from seed 0's cache entry"
    fresh = _fresh(monkeypatch, tmp_path, "fresh", "synthetic", Pool4(), 8, recipe=seed1)
    _assert_same(second, fresh)
    assert not np.allclose(fresh.features, first.features)
    np.testing.assert_array_equal(second.labels, fresh.labels)


def test_a_reference_folder_image_replaced_by_one_of_the_same_size_is_read_again(tmp_path, monkeypatch):
    """Mutation: the folder's listing digest drops each file's mtime. One image replaced by another of the
    same byte size (an 8x8 BMP is 246 bytes whatever its pixels), with a new mtime, is another reference:
    its statistics are computed again, equal to those of a cache of its own."""
    from PIL import Image

    ref = _class_folder(tmp_path / "ref")
    first, computed = _load(ref, Pool4(), 8)
    assert computed
    target = ref / "dogs" / "1.bmp"
    size, mtime_ns = target.stat().st_size, target.stat().st_mtime_ns
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(target)
    os.utime(target, ns=(mtime_ns + 5_000_000_000, mtime_ns + 5_000_000_000))
    assert target.stat().st_size == size and target.stat().st_mtime_ns != mtime_ns
    second, computed = _load(ref, Pool4(), 8)
    assert computed, "the replaced image's stale statistics were read from the cache"
    fresh = _fresh(monkeypatch, tmp_path, "fresh", ref, Pool4(), 8)
    _assert_same(second, fresh)
    # only image 4 (dogs/1) changed: a flat 200 everywhere, so its 48 pooled features are all 200 / 255
    np.testing.assert_array_equal(np.delete(fresh.features, 4, axis=0), np.delete(first.features, 4, axis=0))
    np.testing.assert_allclose(fresh.features[4], np.full(48, 200 / 255), rtol=1e-6)  # float32 (~6e-8 relative)
    assert not np.allclose(fresh.features[4], first.features[4])


def test_a_dataset_reference_reading_the_recipes_root_is_read_again_after_its_images_change(tmp_path, monkeypatch):
    """``--ref image_folder`` reads the recipe's data.root: its cache key held the data section alone, so
    after the folder's images were replaced (and one added) zoo eval scored against the old images'
    statistics, silently, while ``--ref`` of the same folder by path computed them again."""
    from PIL import Image

    ref = _class_folder(tmp_path / "ref")
    recipe = zoo.load_recipe(RECIPE, ["data.dataset=image_folder", f"data.root={ref}", "data.num_classes=2"])
    first, computed = _load("image_folder", Pool4(), 8, recipe=recipe)
    assert computed
    assert not _load("image_folder", Pool4(), 8, recipe=recipe)[1]  # unchanged: read back
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(ref / "cats" / "3.bmp")
    second, computed = _load("image_folder", Pool4(), 8, recipe=recipe)
    assert computed, "the changed folder's stale statistics were read from the cache"
    assert len(second.features) == len(first.features) + 1
    _assert_same(second, _fresh(monkeypatch, tmp_path, "fresh", "image_folder", Pool4(), 8, recipe=recipe))


def test_an_npz_reference_rewritten_with_other_pixels_of_the_same_size_is_read_again(tmp_path, monkeypatch):
    """Mutation: the .npz key drops its mtime. ref.npz rewritten with other pixels of the same shape (np.savez
    of the same shapes and dtypes: the same byte size) and a new mtime: its features are extracted again,
    equal to those of a cache of its own, and differ from the first file's."""
    path = tmp_path / "ref.npz"
    rng = np.random.default_rng(1)
    labels = np.arange(12) % 3
    np.savez(path, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), arr_1=labels)
    first, computed = _load(path, Pool4(), 8)
    assert computed
    size, mtime_ns = path.stat().st_size, path.stat().st_mtime_ns
    np.savez(path, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), arr_1=labels)
    os.utime(path, ns=(mtime_ns + 5_000_000_000, mtime_ns + 5_000_000_000))
    assert path.stat().st_size == size and path.stat().st_mtime_ns != mtime_ns
    second, computed = _load(path, Pool4(), 8)
    assert computed, "the old file's features were read from the cache"
    fresh = _fresh(monkeypatch, tmp_path, "fresh", path, Pool4(), 8)
    _assert_same(second, fresh)
    assert not np.allclose(fresh.features, first.features)


def test_a_labelled_reference_read_from_the_cache_keeps_its_labels(tmp_path):
    """Mutation: the labels read from a cache entry are dropped. The second load of a folder of class folders
    comes from the cache and must carry the labels 0, 0, 0, 1, 1, 1 (cats, dogs) the first computed, so a
    per-class FD is still given against it (the second ``zoo eval`` lost it: 'the reference has no labels')."""
    ref = _class_folder(tmp_path / "ref")
    first, computed = _load(ref, Pool4(), 8)
    assert computed and first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    second, computed = _load(ref, Pool4(), 8)
    assert not computed
    assert second.labels is not None and second.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert second.classes == ["cats", "dogs"]
    generated = Features(first.features.astype(np.float64) + 0.5, labels=np.array([0, 0, 0, 1, 1, 1]))
    for reference in (first, second):
        out = compute_metrics(generated, reference, num_classes=2, class_names=["cats", "dogs"])
        # each class's features shifted by 0.5 in all 48 coordinates: FD = 48 * 0.25 = 12 (same covariance;
        # float32 features summed in float64: the shift's square is exact, rounding ~1e-12)
        assert out["per_class_fd"] == pytest.approx({"0": 12.0, "1": 12.0}, rel=1e-9)
        assert "per_class_fd_skipped" not in out
    # the npz way too: an ADM batch's arr_1 labels come back from the cache
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(2).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
             arr_1=np.arange(8) % 2)
    assert _load(tmp_path / "ref.npz", Pool4(), 8)[1]
    cached, computed = _load(tmp_path / "ref.npz", Pool4(), 8)
    assert not computed and cached.labels.tolist() == [0, 1] * 4
