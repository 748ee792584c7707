"""``train.eval_every``: a small Fréchet distance of the EMA weights while a run trains.

Every ``eval_every`` steps rank 0 samples ``train.eval_n`` images from a copy of the model that
holds the EMA weights, the way ``zoo eval`` and the sample grids do (:func:`zoo.eval.quick_fd`:
the recipe's ``sample`` section sets solver, steps, guidance and batch size). Sample i has the
same noise, label and solver noise at every evaluation (per-sample seeds from ``sample.seed``, as
``zoo eval`` draws them), so successive values differ only because the weights did. Its features (``train.eval_extractor``,
default the offline ``efficientnet_lite0``) are compared with reference statistics from

* ``train.eval_ref`` when set (what ``zoo eval --ref`` takes: an ``.npz``, an image folder, a
  dataset name with an optional ``:split``), else
* the recipe dataset's ``holdout`` split when it has one (``emoji32``), else
* the training data itself (at most :data:`REF_MAX` images, a fixed seeded subset).

The statistics are computed once per run into ``OUT/eval/fd_reference.npz`` (written
atomically, in the layout ``zoo eval --ref`` reads) and read back by a resumed run. The global
RNG state is restored after every evaluation, so the training losses are those of a run without
it. The other processes of a DDP or FSDP run (which first gather their EMA shards for it) wait
at a barrier while rank 0 evaluates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.errors import UserError
from zoo.options import TRAIN_OPTIONS
from zoo.training.sections import UNSET_MEANS, data_setting

EVAL_N = UNSET_MEANS["eval_n"]  # samples per evaluation unless train.eval_n says otherwise
REF_MAX = 10_000  # training images in the reference statistics at most
REF_FILE = Path("eval") / "fd_reference.npz"
#: ``data`` keys that change no reference image: flips are the trainer's, the split and size are in the
#: reference's description ("emoji32:holdout", "image_folder:train (16 images)"), the image size is the
#: samples' (recorded apart), the latent keys are another reference's (latent data needs train.eval_ref).
NOT_REFERENCE_DATA = ("random_flip", "cache", "num_workers", "split", "image_size", "latent", "vae", "vae_file",
                      "vae_scale")


def _rng_kept(device: torch.device):
    """The global CPU (and this CUDA device's) RNG state, restored on exit."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


class FDHook:
    """Rank 0's evaluator of one run: the extractor, the reference source and its cached statistics."""

    def __init__(self, recipe: Mapping[str, Any], train: Mapping[str, Any], dataset: Dataset,
                 shape: tuple[int, ...], out: Path, device: torch.device, log: Callable[[str], None]) -> None:
        from zoo.eval.extractors import build_extractor, require_rgb_samples
        from zoo.sample import vae_weights
        from zoo.training.data import gives_latents
        from zoo.vae import vae_downsample

        self.recipe, self.out, self.device, self.log = recipe, Path(out), device, log
        self.n, self.seed = int(train.get("eval_n") or EVAL_N), int(train.get("seed") or 0)
        data = recipe.get("data") or {}
        self.ref_spec = train.get("eval_ref")
        self.data = {k: v for k, v in data.items() if k != "num_workers"}  # what the reference depends on
        if self.data.get("root") is not None:  # data/imgs, ./data/imgs/ and its absolute path are one folder
            self.data["root"] = os.path.realpath(os.path.expanduser(str(self.data["root"])))
        self._stamp: str | None = None  # the reference files' stamp, taken once per process (prepare)
        self._statistics: str | None = None  # statistics_key, taken once per process
        if self.ref_spec is None and gives_latents(data):
            raise UserError("train.eval_every on latent data needs reference images: set train.eval_ref to an ADM "
                            "reference batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder",
                            key_path="train.eval_ref")
        weights = vae_weights(recipe, None, TRAIN_OPTIONS)  # a latent model without local VAE weights fails now, not at step eval_every
        self.image_size = int(shape[-1]) * (vae_downsample(weights) if weights is not None else 1)
        if weights is None:
            require_rgb_samples(int(shape[0]), self.image_size, "its FD",
                                "set train.eval_every to 0; train.val_every gives a validation loss of any images",
                                key_path="train.eval_every")
        with _rng_kept(device):  # building a network draws its initial weights
            self.extractor = build_extractor(str(train.get("eval_extractor") or UNSET_MEANS["eval_extractor"]),
                                             device=device, options=TRAIN_OPTIONS)
        self.dataset, self.source = self._reference_dataset(data, dataset, shape, recipe)
        self.ref_data = self._reference_data(data, recipe, dataset) if self.dataset is not None else {}

    def _reference_dataset(self, data: Mapping[str, Any], dataset: Dataset, shape: tuple[int, ...],
                           recipe: Mapping[str, Any]) -> tuple[Dataset | None, str]:
        """(images to compute the statistics from, or None for ``eval_ref``; a description of them)."""
        self.seed_picks = False  # whether train.seed chose the reference images (a subset, synthetic data)
        if self.ref_spec is not None:
            return None, str(self.ref_spec)
        from torch.utils.data import Subset

        from zoo import registry
        from zoo.sample import num_classes
        from zoo.training.data import held_out

        images, source = held_out(data, dataset, shape, num_classes(recipe), self.seed, limit=REF_MAX)
        builder = registry.get("dataset", data_setting(data, "dataset"))
        self.seed_picks = isinstance(images, Subset) or getattr(builder, "seeded_images", True)  # a plugin: maybe
        if len(images) < 2:
            raise UserError(f"train.eval_every: the reference images ({source}) hold {len(images)} image(s); "
                            "reference statistics need at least 2 (or set train.eval_ref)", key_path="train.eval_ref")
        return images, source

    def _reference_data(self, data: Mapping[str, Any], recipe: Mapping[str, Any], dataset: Dataset) -> dict:
        """:func:`zoo.eval.reference.reference_data` of the run's reference images (drawn from ``dataset``,
        the training images, where ``train.seed`` picked them)."""
        from zoo.eval.reference import reference_data

        return reference_data(data, recipe, len(dataset) if self.seed_picks else None)

    @property
    def ref_path(self) -> Path:
        return self.out / REF_FILE

    def _identity(self) -> str:
        from zoo.eval.reference import CACHE_VERSION  # how images are read: statistics of older pixels are not these
        from zoo.eval.reference import reference_name

        source = self.source if self.ref_spec is None else reference_name(str(self.ref_spec), TRAIN_OPTIONS)
        return json.dumps({"source": source, "data": self.data, "image_size": self.image_size, "seed": self.seed,
                           "extractor": self.extractor.describe(), "v": CACHE_VERSION, "files": self._files()},
                          sort_keys=True, default=str)

    def _files(self) -> str:
        """The reference files' stamp (names, labels, sizes, times; ``""`` for images zoo makes): a folder whose
        images were replaced since the statistics were made is measured again. Taken once per process."""
        from zoo.eval.reference import files_stamp, items_stamp

        if self._stamp is None:
            self._stamp = (items_stamp(self.dataset) if self.dataset is not None else
                           files_stamp(str(self.ref_spec), self.image_size, self.recipe, TRAIN_OPTIONS))
        return self._stamp

    @property
    def reference_key(self) -> str:
        """A short hash of what the reference statistics are of: ``fd_ref`` names the images in words
        ("image_folder:train (16 images)"), which two folders, image sizes or subsets share; FDs of two keys
        are not comparable. Unlike the cache's identity, what leaves the images as they are is left out, so
        two runs that differ there compare: flips, the cache file's place, defaults written out, train.seed
        where it picked no image (a holdout split, a whole folder), the extractor weights' path (their
        sha256 stays), how a path is spelled."""
        return self._key()

    @property
    def statistics(self) -> str | None:
        """:func:`zoo.eval.reference.statistics_key` of the reference, as zoo eval records it for the same
        ``--ref`` (``train.eval_ref``, else the dataset's holdout split), so zoo compare sees the two FDs
        measured alike; None for a subset of the training images, which no ``--ref`` names."""
        from zoo.eval.reference import statistics_key

        spec = self.ref_spec if self.ref_spec is not None else self.source  # held_out's "emoji32:holdout"
        if self._statistics is None and (self.ref_spec is not None or self.source.endswith(":holdout")):
            self._statistics = statistics_key(str(spec), self.image_size, self.extractor.describe(), self.recipe,
                                              TRAIN_OPTIONS)
        return self._statistics

    def _key(self, as_typed: bool = False) -> str:
        """:attr:`reference_key`; ``as_typed``: with the paths as the recipe spells them, the key of a run
        started before 2026-12-07 (a resume of it with the same spelling has the same reference)."""
        from zoo.eval.extractors import extractor_identity

        what = json.loads(self._identity())
        what["data"] = dict(self.ref_data)
        what["extractor"] = extractor_identity(what["extractor"])
        del what["files"]  # times change with a copy of the same images: a change of them has its own note
        if not self.seed_picks:
            del what["seed"]
        if as_typed:
            what["source"] = self.source
            if "root" in what["data"]:
                what["data"]["root"] = (self.recipe.get("data") or {}).get("root")
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode("utf-8", "surrogateescape")
                              ).hexdigest()[:12]

    def prepare(self) -> Path:
        """The run's reference statistics: read back when this run computed them already, else computed now."""
        from zoo.eval.reference import _dataset_batches, extract, load_reference, save_npz
        from zoo.eval.stats import feature_statistics

        identity, key, earlier, earlier_key = self._identity(), self.reference_key, None, None
        with contextlib.suppress(OSError, ValueError, EOFError, zipfile.BadZipFile):  # absent or unreadable: redo
            with np.load(self.ref_path, allow_pickle=False) as f:
                earlier = str(f["identity"]) if "identity" in f.files else ""
                earlier_key = str(f["key"]) if "key" in f.files else None
                if earlier == identity:
                    return self.ref_path
        self.log(f"zoo train: FD reference statistics of {self.source} with {self.extractor.name} "
                 f"-> {self.ref_path} (once per run)")
        # A resumed run whose reference, or zoo's way of reading images, changed since. (Flips, a cache's
        # place or a default written out recompute the statistics, of the same images: no note.)
        if earlier is not None and earlier_key not in (key, self._key(as_typed=True)):
            self.log("zoo train: note: the run's earlier FD reference statistics were made otherwise (other data, "
                     "extractor or reference, or an earlier zoo's image reading): FDs from here on are not "
                     "comparable with the run's earlier ones")
        elif _recorded(earlier, "files", self._files()) not in (self._files(), ""):  # "": not stamped (a root
            # read through a dataset name was not, before 2026-12-07)
            self.log(f"zoo train: note: the reference images ({self.source}) changed on disk since the run's earlier "
                     "FD reference statistics (files replaced, added or removed, or copied anew): FDs from here on "
                     "may not be comparable with the run's earlier ones")
        from zoo.eval.runner import eval_batch_size

        batch = eval_batch_size(self.recipe)
        extras = {}
        with _rng_kept(self.device), torch.no_grad():
            if self.dataset is None:  # (an .npz of another size was warned about here; its size is not known)
                ref = load_reference(self.ref_spec, self.extractor, self.image_size, batch, self.device, self.log,
                                     recipe=self.recipe, options=TRAIN_OPTIONS)
                mu, sigma = ref.mu, ref.sigma
            else:  # the run's own images, at the samples' size: recorded, as zoo eval's statistics files do
                feats = extract(self.extractor, _dataset_batches(self.dataset, batch), self.device)
                mu, sigma = feature_statistics(feats.features)
                extras["resolution"] = np.array((self.image_size, self.image_size), dtype=np.int64)
        save_npz(self.ref_path, mu=mu, sigma=sigma, extractor=np.str_(self.extractor.name),
                 weights_sha256=np.str_(self.extractor.weights_sha256 or ""), source=np.str_(self.source),
                 identity=np.str_(identity), key=np.str_(key), **extras)
        return self.ref_path

    def __call__(self, ema_model: torch.nn.Module, step: int) -> dict:
        """The FD record at ``step`` of ``ema_model``, a copy of the model holding the EMA weights."""
        from zoo.eval import quick_fd
        from zoo.seeds import recipe_seed

        start = time.perf_counter()
        ref = self.prepare()
        with _rng_kept(self.device):
            fd = quick_fd(ema_model, self.recipe, n=self.n, ref=str(ref), extractor=self.extractor,
                          device=self.device)  # seeded by sample.seed, as zoo eval
        return {"step": step, "fd": fd, "fd_n": self.n, "fd_extractor": self.extractor.name, "fd_ref": self.source,
                "fd_ref_key": self.reference_key, "fd_statistics": self.statistics, "fd_seed": recipe_seed(self.recipe, None),
                "fd_seconds": time.perf_counter() - start}


def _recorded(identity: str | None, key: str, default: Any) -> Any:
    """``key`` of a statistics file's recorded identity; ``default`` where it holds none (an earlier zoo's)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return json.loads(identity or "{}").get(key, default)
    return default


def fd_seed_note(run: Path, then: Mapping[str, Any], now: Mapping[str, Any], step: int) -> str | None:
    """A resume's note when its FDs draw from another seed than the run's FDs up to ``step`` did.

    ``run`` is the directory whose ``log.jsonl`` holds those FDs, ``then`` the checkpoint's recipe, ``now``
    the resumed one. An FD record without ``fd_seed`` was drawn from ``train.seed`` (zoo before
    2026-12-07; from then on grids and FDs draw from ``sample.seed``, as ``zoo sample``/``zoo eval``)."""
    from zoo.domains import is_int
    from zoo.seeds import recipe_seed
    from zoo.training.monitor import read_log

    fds = [r for r in read_log(run / "log.jsonl") if "fd" in r and r["step"] <= step]
    if not fds:
        return None
    earlier = fds[-1].get("fd_seed")
    legacy = not is_int(earlier)
    if legacy:
        earlier = int((then.get("train") or {}).get("seed") or 0)
    seed = recipe_seed(now, None)
    if earlier == seed:
        return None
    why = ("zoo drew them from train.seed then; grids and FDs now draw from sample.seed, as zoo sample and zoo eval"
           if legacy else "sample.seed changed")
    return (f"zoo train: note: train.eval_every's FDs from here on draw their samples from seed {seed}, the run's "
            f"FDs up to step {step} from seed {earlier} ({why}): a change between them is partly the draw's")


def fd_hook(recipe: Mapping[str, Any], train: Mapping[str, Any], dataset: Dataset, shape: tuple[int, ...],
            out: Path, ctx, log: Callable[[str], None]) -> FDHook | None:
    """Rank 0's :class:`FDHook` when ``train.eval_every`` asks for one (``None`` elsewhere).

    A setting that cannot work (extractor weights, VAE or reference missing) is a :class:`UserError`
    now rather than at step ``eval_every``; the trainer builds this inside
    :func:`zoo.training.distributed.agreement`, so the other ranks stop with rank 0.
    """
    if not int(train.get("eval_every") or 0) or not ctx.main:
        return None
    return FDHook(recipe, train, dataset, shape, out, ctx.device, log)


def evaluation(hook: Callable[[torch.nn.Module, int], dict] | None, ema_copy: Callable[[], torch.nn.Module | None],
               step: int, ctx, monitor=None) -> None:
    """One evaluation on rank 0 by ``hook`` (an :class:`FDHook` or a validation loss), its record to
    ``monitor.record_eval``; every rank leaves together.

    ``ema_copy`` gives rank 0 a plain model with the EMA weights and the others ``None``; every
    rank calls it (under FSDP each gathers its shards)."""
    ema_model = ema_copy()
    try:
        if hook is not None and ema_model is not None:
            rec = hook(ema_model, step)
            if monitor is not None:
                monitor.record_eval(rec)
    finally:  # also when rank 0's evaluation is cut short by a stop request: the others wait here
        del ema_model
        ctx.barrier()
