"""Reference statistics: what generated samples are compared with, computed once and cached.

``--ref`` is one of

* an ``.npz`` file: an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` uint8
  images N×H×W×3, ``arr_1`` labels when labelled, ``mu``/``sigma`` of TF-Inception pool
  features and the spatial ``mu_s``/``sigma_s``), read as it is: with the ``inception`` extractor
  its ``mu``/``sigma`` are used unchanged; features for precision/recall (and, with any other
  extractor, the statistics) come from its images. A statistics file written by zoo has the
  same ``mu``/``sigma`` keys plus ``features``, ``labels``, the extractor that made them and the
  ``resolution`` (H, W) of its images;
* an image folder (``root/CLASS/*.png|jpg``, classes sorted: the labels), read and centre-cropped
  to the generated resolution as the training data are;
* a registered dataset name, optionally with a split: ``emoji32`` (its ``holdout`` split when it
  has one), ``emoji32:train``.

Features of images are computed once per (source, resolution, extractor and its weights' sha256; for a
folder: its files, their labels, sizes and times) and
cached as ``.npz`` in the ADM layout (``mu``, ``sigma``) plus ``features`` and ``labels``, under
``<cache>/eval/``, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from zoo.atomic import STALE_AFTER_S, remove_file_leftovers, write_file, write_text
from zoo.errors import UserError
from zoo.cache import cache_root
from zoo.eval.extractors import extractor_identity, extractor_output
from zoo.eval.metrics import Features, Reference
from zoo.eval.stats import covariance_problem, feature_statistics
from zoo.options import EVAL_OPTIONS, CommandOptions

CACHE_VERSION = 2  # 2: image folders composite transparency on white and read 16-bit PGMs and float TIFFs at scale


def save_npz(path: Path, **arrays) -> Path:
    """``np.savez`` written atomically (a temporary file beside ``path``, renamed over it)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return write_file(path, write)


def save_text(path: Path, text: str) -> Path:
    """A UTF-8 text file written atomically."""
    return write_text(path, text)


@torch.no_grad()
def extract(extractor, batches: Iterable[tuple[Tensor, Tensor | None]], device: str | torch.device = "cpu",
            progress: Callable[[int], None] | None = None) -> Features:
    """Run ``extractor`` over batches of (uint8 images (B, 3, H, W), labels (B,) or None)."""
    feats, logits, labels = [], [], []
    for images, y in batches:  # every batch with the first one's widths: np.concatenate would refuse them raw
        f, l = extractor_output(extractor, images.to(device),
                                (feats[0].shape[1], logits[0].shape[1] if logits else None) if feats else None)
        feats.append(f.double().cpu().numpy())
        if l is not None:
            logits.append(l.double().cpu().numpy())
        if y is not None:
            labels.append(np.asarray(y, dtype=np.int64))
        if progress is not None:
            progress(len(images))
    if not feats:
        raise UserError("no images to extract features from")
    return Features(np.concatenate(feats), np.concatenate(logits) if logits else None,
                    np.concatenate(labels) if len(labels) == len(feats) else None)


def to_uint8(x: Tensor) -> Tensor:
    """Images in [−1, 1] → uint8 in [0, 255] (the rounding of the PNG grids)."""
    return ((x.float().clamp(-1, 1) + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _latents_made_from(path: Path) -> str | None:
    """The image folder a ``zoo prepare-latents`` output at ``path`` was made from, ``None`` if it is none."""
    from zoo.jsonfile import read_json_object
    from zoo.latents import MANIFEST, PLAN

    for name in (MANIFEST, PLAN):
        if (path / name).is_file():
            try:
                root = read_json_object(path / name, "latent manifest").get("root")
            except UserError:
                continue
            return str(root) if root else "IMAGE_DIR"
    return None


def _dataset_batches(dataset, batch_size: int, labelled: bool = True) -> Iterator[tuple[Tensor, Tensor | None]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        yield to_uint8(x), torch.as_tensor(y) if labelled else None


def array_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int):
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        yield chunk, None if labels is None else labels[start:start + batch_size]


def dataset_reference(spec: str, options: CommandOptions = EVAL_OPTIONS) -> tuple[str, str]:
    """(dataset, split) that ``--ref NAME[:SPLIT]`` means: a dataset's ``holdout`` split when it has
    one and none is named, so ``emoji32`` and ``emoji32:holdout`` are one reference."""
    from zoo import registry

    name, _, split = spec.partition(":")
    if name not in registry.names("dataset"):
        raise UserError(f"{options.ref} {spec!r} is neither an .npz file, an image folder nor a registered dataset "
                        f"({', '.join(registry.names('dataset'))})")
    splits = getattr(registry.get("dataset", name), "splits", ())
    split = split or ("holdout" if "holdout" in splits else "")
    if split and split not in splits:
        raise UserError(f"dataset {name} has no split {split!r}" + (f"; its splits are {', '.join(splits)}" if splits
                        else " (it has none)"),
                        suggestion=options.given("ref", name + (f":{splits[0]}" if splits else "")))
    return name, split


def reference_name(spec: str, options: CommandOptions = EVAL_OPTIONS) -> str:
    """One name per reference ``spec`` (``--ref``, ``train.eval_ref``): an existing path resolved (``imgs``,
    ``./imgs/`` and its absolute path are one folder), a dataset with its split (``emoji32`` = ``emoji32:holdout``)."""
    if _names_a_path(spec):
        return str(Path(spec).expanduser().resolve())
    return ":".join(dataset_reference(spec, options))


def _names_a_path(spec: str) -> bool:
    """Whether a reference ``spec`` is a path (an existing one, or a missing .npz or path with a separator,
    refused where it is read) rather than a dataset name."""
    path = Path(spec).expanduser()
    return path.exists() or path.suffix.lower() == ".npz" or os.sep in spec


def files_stamp(spec: str, image_size: int, recipe: Mapping[str, Any] | None = None,
                options: CommandOptions = EVAL_OPTIONS) -> str:
    """What a reference's files are now: an .npz's size and time, a folder's listing (every image's name,
    label, size and time), the same listing of the recipe's root for a dataset that reads one
    (``image_folder``); for a dataset whose images zoo makes, its name."""
    path = Path(spec).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir() or not _names_a_path(spec):
        return _images_source(spec, image_size, recipe, options)[0]
    return ""  # a missing file: refused where it is read


def items_stamp(dataset: Any) -> str:
    """:func:`files_stamp` of a dataset's images where it reads them from files (an image folder, or a
    subset of one); ``""`` for images made in memory."""
    from torch.utils.data import Subset

    base, picked = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    items = getattr(base, "items", None)
    if not isinstance(items, list) or not all(isinstance(i, tuple) and isinstance(i[0], Path) for i in items):
        return ""
    chosen = items if picked is None else [items[i] for i in picked]
    return _listing_digest(Path("/"), [(file.resolve(), label) for file, label in chosen])


def reference_data(data: Mapping[str, Any], recipe: Mapping[str, Any], of: int | None = None) -> dict:
    """The ``data`` settings a dataset's reference images depend on, with the defaults filled in: the dataset,
    its root (resolved) where it reads one, a plugin's other settings; ``of``: the size of the dataset
    ``train.seed`` drew them from, so the classes of images drawn per class (synthetic) count too. A default
    written out (``split: train``), flips or a cache's place leave the images as they are."""
    from zoo import registry
    from zoo.sample import num_classes
    from zoo.training.data import reads_root
    from zoo.training.eval_hook import NOT_REFERENCE_DATA
    from zoo.training.sections import data_setting

    name = data_setting(data, "dataset")
    builder = registry.get("dataset", name)
    described = {"dataset": name}
    if reads_root(builder) and data.get("root") is not None:  # data/imgs, ./data/imgs/, its absolute path: one folder
        described["root"] = os.path.realpath(os.path.expanduser(str(data["root"])))
    if of is not None:  # images drawn from the seed (per class), or a subset of so many
        described.update(num_classes=num_classes(recipe), of=of)
    if getattr(builder, "reads", None) is None:  # a plugin: whatever else it may read
        described.update({k: v for k, v in data.items() if k not in NOT_REFERENCE_DATA and k not in described})
    return described


def statistics_key(spec: str, image_size: int, extractor: Mapping[str, Any],
                   recipe: Mapping[str, Any] | None = None, options: CommandOptions = EVAL_OPTIONS) -> str:
    """A short hash of which reference statistics an FD is measured against, one definition for zoo eval's
    results and train.eval_every's records, so zoo compare tells FDs against the same statistics from others:
    the reference resolved (:func:`reference_name`), the images' size, the extractor (its weights' sha256, not
    their path), the listing of a folder's files (an .npz's size and time), and for a dataset the settings of
    ``recipe`` that made its images where it trains on it (:func:`_dataset_statistics_of`)."""
    if _names_a_path(spec):
        images: Any = files_stamp(spec, image_size, None, options)  # the folder's resolved path is in its stamp
    else:
        images = _dataset_statistics_of(spec, image_size, recipe, options)
    what = {"reference": reference_name(spec, options), "image_size": int(image_size), "images": images,
            "extractor": extractor_identity(extractor), "v": CACHE_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode("utf-8", "surrogateescape")
                          ).hexdigest()[:12]


def _dataset_statistics_of(spec: str, image_size: int, recipe: Mapping[str, Any] | None,
                           options: CommandOptions) -> dict:
    """What a dataset reference's images are, for :func:`statistics_key`: :func:`reference_data`, and where
    ``recipe`` trains on it the listing of the files it reads (replaced images are other statistics) and, for
    images ``train.seed`` draws, what they are drawn from (the keys the dataset reads, the classes, the seed);
    settings that leave the images as they are (workers, flips, a default written out) are not in it."""
    from zoo import registry
    from zoo.training.eval_hook import NOT_REFERENCE_DATA

    name, _, dataset, _, made = _dataset_images(spec, image_size, recipe, options)
    images = reference_data(made["data"] if made else {"dataset": name}, recipe or {})
    if made is None:
        return images
    builder = registry.get("dataset", name)
    if getattr(builder, "seeded_images", True):
        reads = getattr(builder, "reads", None)
        keys = [k for k in made["data"] if reads is None or k in reads]
        images.update({k: made["data"][k] for k in keys if k not in NOT_REFERENCE_DATA and k != "dataset"},
                      classes=made["classes"], seed=made["seed"])
    files = items_stamp(dataset)
    if files:
        images["files"] = files
    return images


def _images_source(spec: str, image_size: int, recipe: Mapping[str, Any] | None = None,
                   options: CommandOptions = EVAL_OPTIONS) -> tuple[str, Callable[[int], Iterator], int, list[str]]:
    """(identity for the cache key, batches(batch_size), count, class names or ``[]``) of a folder or
    dataset reference.

    A dataset the model's ``recipe`` trains on is built from its data section (its root, size,
    classes and seed: ``--ref synthetic`` is the run's own synthetic images); another one from its
    name alone, which a dataset that reads a root or is made per recipe cannot be.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        from zoo.training.data import IMAGE_SUFFIXES, ImageFolder

        dataset, loose = ImageFolder(path, image_size), ImageFolder(path, image_size, flat=True)
        if dataset.items and loose.items:  # which of the two is the reference? Neither is dropped silently
            shown = ", ".join(dataset.classes[:3]) + (", ..." if len(dataset.classes) > 3 else "")
            raise UserError(f"reference folder {path} holds {len(loose.items)} images of its own and "
                            f"{len(dataset.items)} in subfolders ({shown}): a reference is either a folder of "
                            "images (as pytorch-fid reads one) or of class folders, not both",
                            suggestion=f"move the subfolders out of {path} to score against its own images, or "
                            "its own images into a class folder")
        if not dataset.items:  # no class folders: the images in the folder itself, as pytorch-fid reads one
            dataset = loose
        if not dataset.items:
            made_from = _latents_made_from(path)
            if made_from is not None:  # zoo prepare-latents output: the reference is the images it encoded
                raise UserError(f"reference folder {path} holds latents (zoo prepare-latents output), not images",
                                suggestion="pass the images they were made from: " + options.given("ref", made_from))
            raise UserError(f"reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither in "
                            f"itself nor in class subfolders", suggestion=f"lay it out as {path}/IMAGE or "
                            f"{path}/CLASS/IMAGE")
        flat = not dataset.classes  # its images have no labels: no per-class FD against them
        identity = (f"folder{'-flat' * flat}:{path.resolve()}:{image_size}:"
                    f"{_listing_digest(path, dataset.items)}")
        return identity, lambda b: _dataset_batches(dataset, b, labelled=not flat), len(dataset), dataset.classes
    name, split, dataset, data, made = _dataset_images(spec, image_size, recipe, options)
    identity = f"dataset:{name}:{split}:{image_size}"
    if made is not None:  # the run's own data: the cache key holds what made it, and the files it read now
        identity += ":" + hashlib.sha256(json.dumps([made["data"], made["classes"], made["seed"]], sort_keys=True,
                                                    default=str).encode()).hexdigest()[:16]
        files = items_stamp(dataset)  # (images replaced under the same root are other statistics)
        identity += f":{files}" if files else ""
    from zoo.training.data import class_names

    return identity, lambda b: _dataset_batches(dataset, b), len(dataset), class_names(data)


def _dataset_images(spec: str, image_size: int, recipe: Mapping[str, Any] | None,
                    options: CommandOptions) -> tuple[str, str | None, Any, dict, dict | None]:
    """(dataset name, split, its reference images, the data section they were built from, and where
    ``recipe`` trains on it what made them: ``{"data", "classes", "seed"}``, else ``None``) of a registered
    dataset reference ``spec``."""
    from zoo import registry
    from zoo.training.data import gives_latents, reads_root

    name, split = dataset_reference(spec, options)
    build = registry.get("dataset", name)
    own = dict((recipe or {}).get("data") or {})
    trains_on = recipe is not None and own.get("dataset", "synthetic") == name  # (no data section: synthetic)
    own = own if trains_on else {}
    if name == "synthetic" and not trains_on:
        raise UserError(f"{options.ref} {spec}: synthetic images are made from a recipe's data section, and this "
                        "model's recipe trains on other data", suggestion="pass an image folder, an .npz or emoji32")
    if own and gives_latents(own):  # its items are latents: nothing in it is an image the decoded samples could match
        raise UserError(f"{options.ref} {spec}: this model's {name} training data are latents, not images",
                        suggestion="pass the images they were made from: " + options.given("ref", "/path/to/images")
                        + ", or an .npz")
    if not own.get("root") and reads_root(build):
        raise UserError(f"{options.ref} {spec} reads its images from a data.root, and this model's recipe sets none "
                        "for it", suggestion="pass the image folder itself: " + options.given("ref", "/path/to/images")
                        + " (CLASS/IMAGE inside)")
    data = {**own, "dataset": name, "image_size": image_size, **({"split": split} if split else {})}
    if name == "synthetic":
        data.pop("image_size")  # the synthetic images take the model's input size, given as the shape
    from zoo.sample import num_classes

    classes, seed = (None, 0)
    if trains_on:
        classes, seed = num_classes(recipe), int((recipe.get("train") or {}).get("seed", 0))
    dataset = build(data, (3, image_size, image_size), classes, seed)
    return name, split, dataset, data, ({"data": own, "classes": classes, "seed": seed} if trains_on else None)


def _listing_digest(root: Path, items: list[tuple[Path, int]]) -> str:
    """sha256 of every image's path under ``root``, label, size and mtime: statistics cached for a
    folder are reused only while the same files carry the same labels (a renamed class folder
    relabels its images, a replaced file changes its stamp)."""
    digest = hashlib.sha256()
    for file, label in items:
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


#: The .npz references zoo reads, said where a file is none of them.
NPZ_FORMATS = "give an ADM-style .npz (arr_0: uint8 images N x H x W x 3) or statistics zoo eval wrote"

#: What np.load and reading its arrays raise for a file that is not a (complete, pickle-free) .npz.
NPZ_ERRORS = (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile)


def unreadable_npz(err: Exception, path: Path) -> str:
    """Why ``path`` could not be read, in words."""
    if path.is_file() and not zipfile.is_zipfile(path):
        return "not an .npz (zip) archive"
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "an array is missing"
    text = str(err).splitlines()[0] if str(err) else ""
    if "allow_pickle" in text:
        return "it holds object arrays (pickled Python objects), which zoo does not load"
    return text or type(err).__name__


def _cache_path(identity: str, extractor) -> Path:
    """Where the statistics of ``identity``'s images under ``extractor`` are cached: keyed by the weights'
    sha256, not their path (a copy or symlink of the same weights computed every feature again)."""
    key = json.dumps({"v": CACHE_VERSION, "source": identity, "extractor": extractor_identity(extractor.describe())},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "eval" / f"ref-{extractor.name}-{digest}.npz"


def _warn_resolution(height: int, width: int, image_size: int, log: Callable[[str], None]) -> None:
    """A reference of another resolution than the samples is used as given, with this warning."""
    if (height, width) != (image_size, image_size):
        log(f"zoo eval: warning: the reference's images are {height}x{width}, the samples "
            f"{image_size}x{image_size}: the extractor resizes both, but an FD across resolutions also measures "
            "the resolution (use a reference made at the samples' size)")


def _from_cache_or_compute(identity: str, extractor, batches: Callable[[], Iterable], device, source: str,
                           log: Callable[[str], None], resolution: tuple[int, int]) -> Reference:
    """The reference from its cached statistics, else computed and cached with the ``resolution`` (H, W) of
    its images, so the file used as ``--ref`` later warns at other samples' size as the images do."""
    path = _cache_path(identity, extractor)
    remove_file_leftovers(path, untouched_for=STALE_AFTER_S)  # writes killed long ago (a valid cache is not rewritten)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                labels = f["labels"] if "labels" in f.files else None
                return Reference(f["mu"], f["sigma"], f["features"], labels, source=source)
        except NPZ_ERRORS as err:  # a damaged cache entry is computed again, not an error
            log(f"zoo eval: cached statistics {path} are unreadable ({unreadable_npz(err, path)}); computing them again")
    log(f"zoo eval: computing reference features of {source} with {extractor.name} (cached in {path})")
    feats = extract(extractor, batches(), device)
    mu, sigma = feature_statistics(feats.features)
    extras = {} if feats.labels is None else {"labels": feats.labels}
    try:
        save_npz(path, mu=mu, sigma=sigma, features=feats.features.astype(np.float32),
                 extractor=np.str_(extractor.name), weights_sha256=np.str_(extractor.weights_sha256 or ""),
                 source=np.str_(source), resolution=np.array(resolution, dtype=np.int64), **extras)
    except (OSError, UserError) as err:  # an unwritable cache must not throw away features just computed
        log(f"zoo: warning: cannot cache the reference statistics at {path} ({err}); they are used uncached "
            "(set ZOO_CACHE to a writable directory to keep them)")
    return Reference(mu, sigma, feats.features.astype(np.float32), feats.labels, source=source)


@torch.no_grad()
def feature_dimension(extractor, image_size: int, device="cpu") -> int:
    """D of the extractor's features (B, D), from one black image at the samples' size (the extractor
    interface says D only through its output, and a plugin's extractor need not name it)."""
    black = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    features, _ = extractor_output(extractor, black)  # a broken extractor named, not the file it is checked against
    return int(features.shape[-1])


#: How a statistics file unfit to score against is replaced.
RECOMPUTE = ("compute the statistics again from their images, or pass a reference with images (an .npz with arr_0, "
             "an image folder or a dataset)")


def _checked_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray | None,
                        labels: np.ndarray | None, extractor, dim: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``mu`` (D,), ``sigma`` (D, D) a covariance, ``features`` (N, D), all finite, and ``labels`` (N,) integers
    of a statistics file, D the extractor's ``dim``: said when the reference is loaded, not as a traceback of the
    FD after every sample was drawn."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or (features is not None and
                                                              (features.ndim != 2 or features.shape[1] != len(mu))):
        got = f"{mu.shape} and {sigma.shape}" + ("" if features is None else f" and features {features.shape}")
        raise UserError(f"{path}: mu must be (D,) and sigma (D, D)" + (", features (N, D)" if features is not None
                        else "") + f", got {got}", suggestion=NPZ_FORMATS)
    if len(mu) != dim:
        raise UserError(f"{path} holds statistics of {len(mu)} features; the {extractor.name} extractor gives {dim}",
                        suggestion=f"pass statistics of {extractor.name}'s {dim} features, or a reference with "
                        "images to compute them from")
    for name, array in (("mu", mu), ("sigma", sigma), ("features", features)):
        if array is not None and not (array.dtype.kind in "fiu" and np.isfinite(array).all()):
            held = "NaN or inf" if array.dtype.kind in "fiu" else f"{array.dtype} values"
            raise UserError(f"{path}: {name} must hold finite numbers, and it holds {held}", suggestion=RECOMPUTE)
    if labels is not None and (labels.dtype.kind not in "iu" or labels.ndim != 1
                               or (features is not None and len(labels) != len(features))):
        rows = "" if features is None else f" of features' {len(features)} rows"
        raise UserError(f"{path}: labels must hold the class labels{rows} (integers, shape "
                        f"({'N' if features is None else len(features)},)), got {labels.dtype} {labels.shape}",
                        suggestion="save the labels as a 1-D integer array, one per row of features, or leave "
                        "labels out for a reference without classes")
    problem = covariance_problem(sigma)  # (last: a D x D eigen-decomposition)
    if problem is not None:
        raise UserError(f"{path}: {problem}", suggestion=RECOMPUTE)
    return mu, sigma, features, labels


def _npz_reference(path: Path, extractor, batch_size: int, device, log, image_size: int,
                   options: CommandOptions = EVAL_OPTIONS) -> Reference:
    def statistics(mu, sigma, features=None, labels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                     np.ndarray | None]:
        return _checked_statistics(path, mu, sigma, features, labels, extractor,
                                   feature_dimension(extractor, image_size, device))

    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        made_by = str(f["extractor"]) if "extractor" in keys else None
        if made_by is not None:  # a statistics file zoo wrote
            if made_by != extractor.name:
                raise UserError(f"{path} holds {made_by} statistics; evaluate with "
                                + options.given("extractor", made_by))
            checked = statistics(f["mu"], f["sigma"], f["features"] if "features" in keys else None,
                                 f["labels"] if "labels" in keys else None)
            if "resolution" in keys:  # (files written before zoo recorded it: used without the check)
                height, width = f["resolution"].tolist()
                _warn_resolution(height, width, image_size, log)
            return Reference(*checked, source=str(path))
        if "arr_0" not in keys:
            if {"mu", "sigma"} <= keys and extractor.name == "inception":
                return Reference(*statistics(f["mu"], f["sigma"]), source=str(path))  # (no features, no labels)
            if {"mu", "sigma"} <= keys:  # pytorch-fid's or ADM's statistics: of Inception features, nothing else's
                inception = options.given("extractor", "inception")
                raise UserError(f"{path} holds mu/sigma and no images (arr_0): Inception statistics (pytorch-fid, "
                                f"ADM), which only {inception} uses",
                                suggestion=f"{inception} {options.inception_weights}, or a reference with images: "
                                "an .npz with arr_0, an image folder or a dataset")
            raise UserError(f"{path} has no images (arr_0) and no {extractor.name} statistics",
                            suggestion=NPZ_FORMATS)
        images = f["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:  # before arr_1 is checked against it
            raise UserError(f"{path}: arr_0 must be uint8 images N x H x W x 3, got {images.dtype} {images.shape}")
        labels = f["arr_1"] if "arr_1" in keys else None
        if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
            raise UserError(f"{path}: arr_1 must hold the class labels of arr_0's {len(images)} images (integers, "
                            f"shape ({len(images)},)), got {labels.dtype} {labels.shape}",
                            suggestion="save the labels as a 1-D integer array beside arr_0 (ADM's layout), or "
                            "leave arr_1 out for a reference without classes")
        adm_stats = statistics(f["mu"], f["sigma"]) if {"mu", "sigma"} <= keys and extractor.name == "inception" \
            else None  # (checked before extracting every image: the file's mu/sigma replace theirs)
    if len(images) < 2:  # before extracting: a covariance needs two
        raise UserError(f"reference {path} has {len(images)} image(s); statistics need at least 2")
    _warn_resolution(images.shape[1], images.shape[2], image_size, log)  # (folders are cropped to the samples')
    stat = path.stat()
    identity = f"npz:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    ref = _from_cache_or_compute(identity, extractor, lambda: array_batches(images, labels, batch_size), device,
                                 str(path), log, images.shape[1:3])
    if adm_stats is not None:  # the ADM evaluator's own statistics, as they are
        ref.mu, ref.sigma, _, _ = adm_stats
    return ref


def load_reference(spec: str, extractor, image_size: int, batch_size: int = 64, device="cpu",
                   log: Callable[[str], None] = print, recipe: Mapping[str, Any] | None = None,
                   options: CommandOptions = EVAL_OPTIONS) -> Reference:
    """The :class:`Reference` for ``--ref`` (see the module docstring), from the cache when it is there;
    ``recipe``: the model's, whose data section builds a dataset reference it trains on; ``options``:
    what its messages call the caller's options."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz":  # REF.NPZ too: the suffix's case says nothing about the format
        if not path.is_file():
            raise UserError(f"reference file {path} " + ("is a directory" if path.is_dir() else "does not exist"))
        try:
            return _npz_reference(path, extractor, batch_size, device, log, image_size, options)
        except NPZ_ERRORS as err:
            raise UserError(f"cannot read reference {path}: {unreadable_npz(err, path)}",
                            suggestion=NPZ_FORMATS) from None
    identity, batches, count, classes = _images_source(spec, image_size, recipe, options)
    if count < 2:
        raise UserError(f"reference {spec} has {count} image(s); statistics need at least 2")
    reference = _from_cache_or_compute(identity, extractor, lambda: batches(batch_size), device, spec, log,
                                       (image_size, image_size))  # (cropped to the samples' size)
    reference.classes = classes or None
    return reference
