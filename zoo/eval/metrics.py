"""Sample-quality metrics from extracted features: FD, IS, precision/recall, per-class FD.

The metric formulas are torch-fidelity's (Inception Score: ``isc_features_to_metric``;
precision/recall: ``prc_features_to_metric``, the k-NN manifolds of Kynkäänniemi et al. 2019
with k = 3). torch-fidelity was picked over pytorch-fid because it has all of them (pytorch-fid
computes FID only) and its Inception is the TF-compatible port with TF1's resize, and it is
maintained (0.4, 2026). The Fréchet distance is zoo's own :func:`~zoo.eval.stats.frechet_distance`
(float64, a symmetric eigen-decomposition that cannot return NaN or a complex number).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zoo.eval.stats import feature_statistics, frechet_distance, frechet_distance_of_features

NEIGHBOURHOOD = 3  # k of the k-NN manifolds (Kynkäänniemi et al.; torch-fidelity's default)
MIN_PER_CLASS = 2  # a covariance needs two samples


@dataclass
class Features:
    """Extractor outputs of a set of images: features (N, D), logits (N, K) or None, labels (N,) or None."""

    features: np.ndarray
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclass
class Reference:
    """What the generated set is compared with: Gaussian statistics, and features/labels when known."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    source: str = ""
    classes: list[str] | None = None  # the names of labels 0, 1, ... where the reference knows them


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std of the Inception Score over ``splits``, torch-fidelity's formula; fewer splits when
    there are under two samples per split (a one-sample split is its own marginal: IS exactly 1)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits, dtype=np.float32)),
                                 splits=max(1, min(splits, len(logits) // 2)))
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = NEIGHBOURHOOD) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of generated against real features."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if min(len(generated), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples on each side")
    out = prc_features_to_metric(torch.from_numpy(np.asarray(generated, dtype=np.float32)),
                                 torch.from_numpy(np.asarray(real, dtype=np.float32)),
                                 prc_neighborhood=k, save_cpu_ram=True, verbose=False)  # row blocks, the
    # same values: the whole-matrix path held a 50k x 50k float32 distance matrix (10 GB) at 50k samples
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def classes_match(reference: Reference, num_classes: int | None, names: list[str] | None = None) -> bool:
    """Whether the reference's labels are the model's classes: as many classes, each below ``num_classes``
    (``None``: not known, taken as matching), and the same names in the same order where both sides know
    them (``names``: the model's). Label c of a 4-class model is not class c of emoji32."""
    if _names_differ(reference, names):
        return False
    if num_classes is None or reference.labels is None:
        return True
    present = np.unique(reference.labels)
    return len(present) == num_classes and int(present.max()) < num_classes


def _names_differ(reference: Reference, names: list[str] | None) -> bool:
    """Whether both sides name their classes, and not alike."""
    return bool(reference.classes and names and list(reference.classes) != list(names))


def _classes_differ(reference: Reference, num_classes: int, names: list[str] | None = None) -> str:
    """Why a reference's labels are not taken as the model's classes (see :func:`classes_match`)."""
    if _names_differ(reference, names):
        label = next((i for i, (a, b) in enumerate(zip(reference.classes, names)) if a != b),
                     min(len(names), len(reference.classes)))
        there, here = (repr(c[label]) if label < len(c) else "none" for c in (reference.classes, names))
        return (f"the reference's classes are not those the model was trained with ({len(reference.classes)} "
                f"against {len(names)}; label {label} is {there} there and {here} here)")
    present = np.unique(reference.labels)
    if int(present.min()) < 0 or int(present.max()) >= num_classes:
        return (f"the reference's labels run from {int(present.min())} to {int(present.max())}, the model's classes "
                f"from 0 to {num_classes - 1}: its labels are not the model's classes")
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    return (f"the reference's labels cover {len(present)} of the model's {num_classes} classes (missing {shown}): "
            "per-class FD needs a reference of the model's classes, each of them")


def per_class_fd(generated: Features, reference: Reference) -> dict[int, float]:
    """FD per class between generated and reference features of that class (classes with >= 2 on each side)."""
    return {c: fd for c, (fd, _, _) in _per_class(generated, reference).items()}


def _per_class(generated: Features, reference: Reference) -> dict[int, tuple[float, int, int]]:
    """(FD, generated count, reference count) of each class with >= 2 samples on each side."""
    if generated.labels is None or reference.labels is None or reference.features is None:
        return {}
    out = {}
    for c in sorted(set(generated.labels.tolist()) & set(reference.labels.tolist())):
        gen, ref = generated.features[generated.labels == c], reference.features[reference.labels == c]
        if len(gen) >= MIN_PER_CLASS and len(ref) >= MIN_PER_CLASS:
            out[int(c)] = (frechet_distance_of_features(gen, ref), len(gen), len(ref))
    return out


STATISTICS_ONLY = "the reference is statistics only (mu, sigma), without per-image features"


def _no_per_class_fd(generated: Features, reference: Reference) -> str:
    """Why labelled samples get no per-class FD against a reference whose labels are not ruled out."""
    if reference.features is None:
        return STATISTICS_ONLY
    if reference.labels is None:
        return "the reference has no labels (an .npz without arr_1, a folder of images without class folders)"
    sampled = np.unique(generated.labels)
    if not set(sampled.tolist()) & set(reference.labels.tolist()):
        return "none of the sampled classes is among the reference's labels"
    n = len(sampled)
    return (f"{'the' if n == 1 else 'all'} {n} sampled class{'es have' if n != 1 else ' has'} fewer than "
            f"{MIN_PER_CLASS} samples on a side")


def compute_metrics(generated: Features, reference: Reference, k: int = NEIGHBOURHOOD,
                    num_classes: int | None = None, class_names: list[str] | None = None) -> dict:
    """Every metric the inputs allow: ``fd``, ``is_mean``/``is_std``, ``precision``/``recall``, and
    ``per_class_fd`` where the reference's classes are the model's ``num_classes`` (named ``class_names``
    where its checkpoint recorded them). A metric left out says why in ``<metric>_skipped``
    (``is_skipped``, ``precision_recall_skipped``, ``per_class_fd_skipped``): a missing key is never silent."""
    out: dict = {"fd": frechet_distance(*feature_statistics(generated.features), reference.mu, reference.sigma)}
    if generated.logits is not None:
        out["is_mean"], out["is_std"] = inception_score(generated.logits)
    else:
        out["is_skipped"] = "the extractor gives no class logits"
    if reference.features is None:
        out["precision_recall_skipped"] = STATISTICS_ONLY
    elif min(len(generated.features), len(reference.features)) > k:
        out["precision"], out["recall"] = precision_recall(generated.features, reference.features, k)
    else:
        out["precision_recall_skipped"] = (f"the k = {k} nearest neighbours need more than {k} samples on each "
                                           f"side: {len(generated.features)} generated, {len(reference.features)} "
                                           "reference")
    if classes_match(reference, num_classes, class_names):
        classes = _per_class(generated, reference)
        if not classes and generated.labels is not None:
            out["per_class_fd_skipped"] = _no_per_class_fd(generated, reference)
    else:  # (labels c of the two sides are different classes)
        classes = {}
        if generated.labels is not None:
            out["per_class_fd_skipped"] = _classes_differ(reference, num_classes, class_names)
    if classes:  # a class's FD is biased upwards at small counts: the counts say how far to trust each
        out["per_class_fd"] = {str(c): fd for c, (fd, _, _) in classes.items()}
        out["per_class_fd_mean"] = float(np.mean([fd for fd, _, _ in classes.values()]))
        out["per_class_counts"] = {str(c): [n_gen, n_ref] for c, (_, n_gen, n_ref) in classes.items()}
        sampled = len(np.unique(generated.labels)) if generated.labels is not None else len(classes)
        if len(classes) < sampled:
            n = sampled - len(classes)
            out["per_class_fd_left_out"] = (f"{n} sampled class{'es have' if n != 1 else ' has'} fewer than "
                                            f"{MIN_PER_CLASS} samples on a side")
    return out
