"""Pins of zoo.eval statistics, metric and reference-cache details that mutation testing found the rest of the
suite let through.

* ``feature_statistics`` refuses a single feature vector (an unbiased covariance of one sample is NaN, which
  the FD then rejects far from its cause);
* ``precision_recall`` refuses exactly ``k`` samples on a side (the k-NN radius of a sample needs k others);
* a statistics file zoo wrote with another extractor is refused, also where the feature dimension matches;
* a folder reference of one image is refused before extraction, in one line;
* the reference-statistics cache key holds ``CACHE_VERSION`` (how images are read): statistics a zoo of
  another image reading cached are computed again, not reused.

Every expected value is derived by hand or from an independent computation, never copied from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoo.eval import reference
from zoo.eval.metrics import precision_recall
from zoo.eval.reference import load_reference
from zoo.eval.stats import feature_statistics

from pool_extractors import Pool4


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread):
    pass


def test_feature_statistics_of_one_sample_is_refused():
    """Mutation: the ``N >= 2`` check relaxed to ``N >= 1``. One sample's unbiased covariance divides by
    N - 1 = 0: a NaN sigma came back with only a RuntimeWarning. Two samples are the least that work:
    mean (1, 2), covariance [[2, 2], [2, 2]] of rows (0, 1) and (2, 3) (by hand)."""
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.ones((1, 3)))
    mu, sigma = feature_statistics(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_array_equal(mu, [1.0, 2.0])
    np.testing.assert_array_equal(sigma, [[2.0, 2.0], [2.0, 2.0]])


def test_precision_recall_refuses_exactly_k_samples_on_a_side():
    """Mutation: ``<= k`` -> ``< k`` in the refusal. With k = 3 and 3 samples a sample has only 2 others, so
    its 3rd-nearest-neighbour radius does not exist: the call must say what it needs, not reach torch-fidelity.
    With 4 samples on each side (identical sets) precision and recall are 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4))
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        precision_recall(x, x, k=3)
    y = rng.normal(size=(4, 4))
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        precision_recall(y, x, k=3)
    precision, recall = precision_recall(y, y, k=3)
    assert precision == pytest.approx(1.0) and recall == pytest.approx(1.0)


def _flat_folder(root: Path, n: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.bmp")
    return root


def test_statistics_cached_by_a_zoo_of_another_image_reading_are_computed_again(tmp_path, monkeypatch):
    """Mutation: ``CACHE_VERSION`` left out of the cache key. A zoo whose image reading changed (version 2:
    transparency composited on white) reused version 1's cached features of the same folder, which were
    read otherwise: the FD then mixed two readings. Under another version the reference is computed anew;
    under the same version it is read back."""
    ref = _flat_folder(tmp_path / "ref")

    def computed() -> bool:
        said = []
        load_reference(str(ref), Pool4(), 8, log=said.append)
        return any("computing reference features" in line for line in said)

    assert computed()
    assert not computed()  # the same zoo reads its own cache entry back
    monkeypatch.setattr(reference, "CACHE_VERSION", reference.CACHE_VERSION + 1)
    assert computed(), "statistics of another image reading were read from the cache"


class _Pool4Other(Pool4):
    """Another extractor of Pool4's feature dimension (48): same D, another feature space."""

    name = "test_pool4_other"


def test_a_statistics_file_of_another_extractor_is_refused_even_of_the_same_dimension(tmp_path):
    """Mutation: the ``made_by != extractor.name`` refusal removed. Statistics zoo wrote with one extractor
    passed the dimension check for another of the same D, and the FD compared two feature spaces silently."""
    from zoo.errors import UserError
    from zoo.eval.reference import save_npz

    rng = np.random.default_rng(1)
    features = rng.normal(size=(6, 48))
    path = save_npz(tmp_path / "stats.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False),
                    features=features.astype(np.float32), extractor=np.str_(_Pool4Other.name))
    with pytest.raises(UserError, match="holds test_pool4_other statistics; evaluate with --extractor test_pool4_other"):
        load_reference(str(path), Pool4(), 8, log=lambda _: None)
    ref = load_reference(str(path), _Pool4Other(), 8, log=lambda _: None)  # its own extractor reads it as it is
    np.testing.assert_array_equal(ref.mu, features.mean(0))


class _Counting(Pool4):
    calls = 0

    def forward(self, images):
        type(self).calls += len(images)
        return super().forward(images)


def test_a_folder_of_one_image_is_refused_before_any_feature_is_extracted(tmp_path):
    """Mutation: ``count < 2`` -> ``count < 1`` in load_reference. A one-image folder was run through the
    extractor and then failed inside ``feature_statistics`` with a bare ValueError (a traceback) instead of
    zoo's one-line error naming the reference."""
    from zoo.errors import UserError

    ref = _flat_folder(tmp_path / "one", n=1)
    _Counting.calls = 0
    with pytest.raises(UserError, match=r"has 1 image\(s\); statistics need at least 2"):
        load_reference(str(ref), _Counting(), 8, log=lambda _: None)
    assert _Counting.calls == 0
