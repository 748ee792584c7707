"""``zoo eval``'s samples as one ADM-style ``.npz``: what the official evaluation suite reads.

guided-diffusion's ``evaluator.py`` (the FID/sFID/IS/precision/recall numbers of the DiT, U-ViT and
DiMR papers) takes a sample batch ``arr_0`` of uint8 images N×H×W×3, as DiT's ``sample_ddp.py``
writes it; ``arr_1`` holds the class labels. The samples are streamed shard by shard into the zip
archive, so 50k ImageNet samples (9.8 GB at 256 px) never sit in memory at once; the file is
written beside its target and renamed into place.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from zoo.atomic import write_file
from zoo.checkpoint import CONFIG
from zoo.errors import UserError
from zoo.eval.runner import existing_shards, locate, results_of_weights, sample_batches

BATCH = 1024  # images converted and written at a time
MARK = "zoo_export"  # an entry that says zoo wrote the file (so --force may replace it); readers ignore it


def samples_directory(source: Path) -> Path:
    """The ``samples-*`` directory ``source`` names: itself; for a run or checkpoint directory, the one
    ``zoo eval SOURCE`` wrote of its current weights (as its results record them); else the one in an eval
    directory."""
    source = source.expanduser()
    if not source.is_dir():
        raise UserError(f"{source} is not a directory",
                        suggestion="give the samples-* directory zoo eval wrote (RUN/eval/samples-...)")
    if existing_shards(source):
        return source
    try:
        ckpt, eval_dir = locate(source)  # zoo eval's own place for a run or a checkpoint
    except UserError:
        ckpt = None
    if ckpt is not None and (ckpt / CONFIG).is_file():
        found = _samples_of_weights(ckpt, eval_dir)
        if not found:
            raise UserError(f"{ckpt} has no zoo eval samples of its current weights"
                            + (f" (those in {eval_dir} are of another checkpoint or an earlier save)"
                               if any(eval_dir.glob("samples-*")) else ""),
                            suggestion=f"run zoo eval {source} first (or give the samples-* directory of an eval --out)")
    else:
        found = sorted(p for where in {source, source / "eval"} if where.is_dir()
                       for p in where.glob("samples-*") if existing_shards(p))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{source} holds no zoo eval samples (shard-*.npz), nor does a samples-* directory in it",
                        suggestion="run zoo eval first, then give RUN/eval/samples-...")
    names = ", ".join(p.name for p in found)
    raise UserError(f"{source} holds samples of {len(found)} protocols ({names})",
                    suggestion="give the one to export: RUN/eval/samples-...")


def _samples_of_weights(ckpt: Path, eval_dir: Path) -> list[Path]:
    """The ``samples-*`` directories in ``eval_dir`` that ``zoo eval`` results of ``ckpt``'s current weights
    scored (found by name beside the result: a moved run's recorded paths are stale), with shards, sorted."""
    found = {eval_dir / Path(str(result.get("samples"))).name for _, result in results_of_weights(ckpt, eval_dir)}
    return sorted(p for p in found if p.name.startswith("samples-") and existing_shards(p))


def contiguous_count(directory: Path) -> int:
    """How many samples the shards hold from index 0 on without a gap."""
    covered = 0
    for start, stop, _ in existing_shards(directory):
        if start > covered:
            break
        covered = max(covered, stop)
    return covered


def written_by_zoo(path: Path) -> bool:
    """Whether ``path`` is a sample batch this module wrote."""
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{MARK}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def export_adm_npz(source: Path, out: Path, n: int | None = None,
                   force: bool = False) -> tuple[Path, int, tuple[int, ...], bool]:
    """Write samples 0..n-1 of ``source`` (default: all it holds from 0 on) to ``out``; returns
    (out, n, image shape H×W×3, whether labels were written). ``force`` replaces an earlier export."""
    if out.exists() and not (force and written_by_zoo(out)):
        raise UserError(f"--out {out} exists" + (" and is not a sample batch zoo export wrote" if force else ""),
                        suggestion="choose another path" + ("" if force else ", or pass --force to replace an export"))
    directory = samples_directory(source)
    available = contiguous_count(directory)
    n = available if n is None else n
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if n > available:
        raise UserError(f"{directory} holds samples 0..{available - 1}, not the {n} asked for",
                        suggestion=f"run zoo eval with --n {n} first, or export --n {available}")
    first_images, first_labels = next(sample_batches(directory, 1, 1))
    shape = tuple(first_images.permute(0, 2, 3, 1).shape[1:])
    labelled = first_labels is not None

    def write(tmp: Path) -> None:
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                                                         "shape": (n, *shape)})
                for images, batch_labels in sample_batches(directory, n, BATCH):
                    f.write(np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy()).tobytes())
                    if labelled:
                        labels.append(np.asarray(batch_labels, dtype=np.int64))
            if labelled:
                with archive.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.concatenate(labels))
            with archive.open(f"{MARK}.npy", "w") as f:
                np.lib.format.write_array(f, np.array(str(directory)))

    write_file(out, write)
    return out, n, shape, labelled
