"""``zoo prepare-latents``: an ImageNet-style image folder → VAE latent moments on disk.

Each image is centre-cropped the ADM way (:func:`zoo.training.crop.adm_center_crop`) and
encoded together with its horizontal flip, as fast-DiT and REPA pre-extract ImageNet. What is
stored is the encoder's posterior, not one sample of it: ``mean`` and ``std`` of the diagonal
Gaussian, both (N, 2, C, H, W) with view 0 the image and view 1 its flip, unscaled (the
trainer multiplies by ``data.vae_scale``), and ``labels`` (N,) from the sorted class folders.
The ``latents`` dataset draws z = mean + std·ε from a random view at every step.

Layout of ``OUT``: ``shard_XXXXX.safetensors`` (``shard_size`` images each, in folder order),
``images.txt`` (one line per row: the image's path under IMAGE_DIR, a tab, its label; in the
path a backslash, tab, newline or carriage return is written ``\\\\``, ``\\t``, ``\\n``, ``\\r``),
``prepare.json`` (the plan: written first, checked on resume) and ``manifest.json`` (the plan
plus the shard list: written last, once every shard exists). Every file is written to a
temporary name and renamed, so an interrupted run leaves only whole shards, and running the
same command again encodes only the missing ones. Each shard records a digest of its rows'
lines of ``images.txt`` and one of the settings it was made with (resolution, VAE, dtype, shard
size): if images were added or removed since (a broken file deleted), the shards whose rows are
still the same images are kept and the others encoded again; other settings must match the
plan, and a shard made under other ones (its plan deleted) is encoded again. Under ``torchrun`` rank r encodes
shards r, r+world, ...; the rank that finds all shards present writes the manifest (every
rank writes the same bytes, atomically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from zoo.errors import UserError, reported_by_rank_0, some_of
from zoo.jsonfile import read_json_object
from zoo.options import CommandOptions, EVAL_OPTIONS
from zoo.training.crop import IMAGE_DECODING

FORMAT = "zoo-latent-moments"
FORMAT_VERSION = 2  # 2: images.txt and a digest of its rows in every shard
PLAN, MANIFEST, IMAGES = "prepare.json", "manifest.json", "images.txt"
# What fixes every shard's contents: a resumed run must agree on all of these (the image list may change).
SETTINGS = ("format", "version", "resolution", "latent_shape", "views", "dtype", "shard_size", "crop")
VAE_IDENTITY = ("sha256", "scaling_factor", "shift_factor", "latent_channels", "downsample")
VIEWS = ("image", "hflip")


SHARD_NAME = re.compile(r"shard_\d{5,}\.safetensors")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_encoder(vae_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The VAE in ``vae_dir`` and its identity (weights file, sha256, scale, channels); never downloads.

    A diffusers directory (``config.json`` beside the weights, also under ``vae/``) is built from
    its own config; anything else is read as the Stable Diffusion KL-f8 VAE (:func:`zoo.vae.load_vae`).
    """
    from zoo.vae import SCALE, find_vae_weights, load_vae, vae_downsample

    weights = find_vae_weights(vae_dir)
    vae = load_vae(weights).vae  # the decoder of zoo sample and the training grids is built the same way
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)
    if shift:  # SD3 / FLUX VAEs: z = (E(x) - shift) * scale, which zoo's latent codec (z / scale) cannot undo
        raise UserError(f"the VAE in {weights.parent} has shift_factor {shift}; zoo's latent recipes use a VAE "
                        "that only scales (z = scaling_factor * E(x), the Stable Diffusion VAE)",
                        suggestion="use the SD VAE, e.g. stabilityai/sd-vae-ft-ema")
    identity = {"weights": str(weights.resolve()), "sha256": _sha256(weights),
                "scaling_factor": float(getattr(cfg, "scaling_factor", None) or SCALE),
                "shift_factor": float(shift or 0.0),
                "latent_channels": int(cfg.latent_channels), "downsample": vae_downsample(weights)}
    return vae.eval().requires_grad_(False), identity


def _manifest_vae(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The VAE identity the manifest of ``data.root`` records; ``None`` where ``data.root`` is no
    ``zoo prepare-latents`` output (or is gone)."""
    manifest = Path(str(data.get("root") or "")).expanduser() / MANIFEST
    if not data.get("root") or not manifest.is_file():
        return None
    made = read_json_object(manifest, "latent manifest").get("vae")
    return made if isinstance(made, dict) else None


def prepared_with_vae(data: Mapping[str, Any]) -> Path | None:
    """The VAE weights file ``data.root``'s latents were encoded with, where it still lies where
    ``zoo prepare-latents`` read it: the decoder a run on them needs when ``data.vae`` is not given."""
    made = _manifest_vae(data)
    weights = Path(made["weights"]) if made and isinstance(made.get("weights"), str) else None
    return weights if weights is not None and weights.is_file() else None


def check_decoder_fits(weights: Path, data: Mapping[str, Any], options: CommandOptions = EVAL_OPTIONS) -> None:
    """Refuse VAE ``weights`` whose latents differ in shape from those ``data.root`` was prepared with
    (another downsampling or channel count): they decoded the samples at another size without a word.
    Another VAE of the same shape (SD's ft-EMA for ft-MSE) decodes them, as DiT samples with either.
    Nothing is checked when ``data.root`` is no ``zoo prepare-latents`` output (or is gone).
    ``options``: what the message calls the caller's VAE option (zoo train's is data.vae)."""
    from zoo.vae import SD_VAE_CONFIG, vae_config, vae_downsample

    made = _manifest_vae(data)
    if made is None:
        return
    manifest = Path(str(data["root"])).expanduser() / MANIFEST
    have = {"downsample": vae_downsample(weights),
            "latent_channels": int((vae_config(weights) or SD_VAE_CONFIG)["latent_channels"])}
    diff = [f"{key} {have[key]}, not {made[key]}" for key in have if key in made and made[key] != have[key]]
    if diff:
        raise UserError(f"the VAE {weights} does not fit the latents in {manifest.parent} ({'; '.join(diff)}: "
                        f"they were encoded with {made.get('weights', 'another VAE')})",
                        suggestion=f"decode with that VAE: {options.given('vae', prepared_with_vae(data) or 'DIR')}")


@torch.no_grad()
def encode_moments(vae: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior ``mean`` and ``std`` (B, 2, C, h, w) of images ``x`` (B, 3, H, W) in [-1, 1] and their flips."""
    both = torch.cat([x, x.flip(-1)])
    posterior = vae.encode(both).latent_dist
    b = x.shape[0]

    def views(t: Tensor) -> Tensor:
        return torch.stack([t[:b], t[b:]], dim=1).float()

    return views(posterior.mean), views(posterior.std)


# A file name may hold a tab or a line break: escaped, each row stays one line of two fields.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def image_lines(root: Path, items: list[tuple[Path, int]]) -> list[str]:
    """One ``images.txt`` line per row: the image's path under ``root`` (POSIX, ``\\``, tab, newline
    and carriage return escaped as ``\\\\``, ``\\t``, ``\\n``, ``\\r``), a tab, its label."""
    return [f"{Path(path).relative_to(root).as_posix().translate(_ESCAPES)}\t{label}\n" for path, label in items]


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8; a file name that is not UTF-8 keeps its own bytes (``surrogateescape``)."""
    return text.encode("utf-8", "surrogateescape")


def rows_digest(lines: list[str]) -> str:
    """The sha256 of some rows' ``images.txt`` lines: a shard is current if it holds the same rows."""
    return hashlib.sha256(_utf8("".join(lines))).hexdigest()


def _plan_decoding(out: Path) -> int:
    """The image reading ``out``'s plan was made with (1 where its plan is older than the record)."""
    try:
        decoding = json.loads((out / PLAN).read_text()).get("image_decoding", 1)
    except (OSError, ValueError, AttributeError):
        return IMAGE_DECODING
    return decoding if isinstance(decoding, int) else 1


def make_plan(root: Path, classes: list[str], lines: list[str], resolution: int, shard_size: int, identity: dict,
              dtype: str) -> dict[str, Any]:
    """Everything that fixes the output's contents: the ``SETTINGS``, the image folder and its image list."""
    c, f = identity["latent_channels"], identity["downsample"]
    num_images = len(lines)
    return {"format": FORMAT, "version": FORMAT_VERSION, "num_images": num_images, "resolution": resolution,
            "latent_shape": [c, resolution // f, resolution // f], "views": list(VIEWS), "dtype": dtype,
            "shard_size": shard_size, "num_shards": -(-num_images // shard_size), "vae": identity,
            "crop": "adm_center_crop", "root": str(root.resolve()), "num_classes": len(classes), "classes": classes,
            "images": {"file": IMAGES, "sha256": rows_digest(lines)}, "image_decoding": IMAGE_DECODING}


def settings_digest(plan: dict) -> str:
    """The sha256 of what fixes a shard's contents besides its rows: the ``SETTINGS`` and the VAE's identity."""
    fixed = {**{k: plan[k] for k in SETTINGS}, "vae": {k: plan["vae"][k] for k in VAE_IDENTITY}}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def shard_digests(plan: dict, lines: list[str]) -> list[tuple[str, str]]:
    """The (rows, settings) digests every shard of ``plan`` must carry."""
    size, settings = plan["shard_size"], settings_digest(plan)
    return [(rows_digest(lines[k * size:(k + 1) * size]), settings) for k in range(plan["num_shards"])]


def _write_json(path: Path, payload: dict) -> None:
    from zoo.atomic import write_text

    write_text(path, json.dumps(payload, indent=1) + "\n")


def check_or_write_plan(out: Path, plan: dict, lines: list[str]) -> bool:
    """Write ``prepare.json`` and ``images.txt``, or check an existing plan (an interrupted or finished
    run) against this one. Other settings are refused; another image list replaces the old one (and
    the manifest, which no longer describes the output; without a plan a manifest left there is
    deleted too: until the shards are checked it may describe latents of other settings). Returns
    whether the image list changed."""
    from zoo.atomic import write_file

    existing = out / PLAN
    old = None
    if existing.is_file():
        old = read_json_object(existing, "prepare-latents plan", suggestion="if zoo prepare-latents wrote it, delete "
                               "it and run the same command again (the shards of the same images are kept); "
                               "otherwise use a new --out directory")
        if old.get("format") != FORMAT:  # a file of the same name that another tool wrote: not ours to judge
            raise UserError(f"{existing} is not a zoo prepare-latents plan (no format {FORMAT!r} in it)",
                            suggestion="use a new --out directory, or move that file out of this one")
    _refuse_foreign_files(out, _utf8("".join(lines)), planned=old is not None)
    if old is not None:
        if old.get("version") != FORMAT_VERSION:  # its format is ours: checked above
            raise UserError(f"{out} was written by another version of zoo prepare-latents (format version "
                            f"{old.get('version')}, this one writes {FORMAT_VERSION})",
                            suggestion="encode into a new --out directory (or delete that one)")
        diff = [k for k in SETTINGS if old.get(k) != plan[k]]
        old_vae = old.get("vae") or {}
        diff += [f"vae {k}" for k in VAE_IDENTITY if old_vae.get(k) != plan["vae"][k]]  # not its path: dirs move
        if diff:
            raise UserError(f"{out} holds latents prepared with other settings ({', '.join(diff)} "
                            f"differ{'s' * (len(diff) == 1)})",
                            suggestion="use a new --out directory, or the same VAE and options as before")
        earlier = old.get("image_decoding", 1)  # the kept shards' reading: a rewritten plan must not claim a newer one
        plan["image_decoding"] = min(earlier if isinstance(earlier, int) else 1, plan["image_decoding"])
        if old.get("images") == plan["images"]:
            if old.get("root") != plan["root"]:  # the same images in a moved (or copied) folder: the plan follows
                _refuse_another_folder(out, Path(str(old.get("root"))), Path(plan["root"]), lines)
                _write_json(existing, plan)
            return False
        if old.get("root") not in (None, plan["root"]):  # a mistyped IMAGE_DIR would replace the whole output
            raise UserError(f"{out} holds the latents of {old['root']}, not of {plan['root']} (another image list)",
                            suggestion=f"pass {old['root']} to finish or update it, or use a new --out; if "
                            f"the folder moved, delete {out / PLAN} and its shards of the same images are kept")
    (out / MANIFEST).unlink(missing_ok=True)
    write_file(out / IMAGES, lambda tmp: tmp.write_bytes(_utf8("".join(lines))))
    _write_json(existing, plan)
    return old is not None


_UNESCAPES = {escaped[1]: chr(char) for char, escaped in _ESCAPES.items()}  # "t" -> tab, ... (image_lines' inverse)


def _path_of(line: str) -> str:
    """The image path of an ``images.txt`` line, its escapes undone."""
    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(1)), line.rsplit("\t", 1)[0])


def _refuse_another_folder(out: Path, old_root: Path, new_root: Path, lines: list[str], probes: int = 8) -> None:
    """The same file names under another IMAGE_DIR are the same images moved or copied only if the old
    folder is gone or its files hold the same bytes: ``train/`` and ``val/`` splits with equal names
    would otherwise pass as a move and the manifest name the wrong folder. Compares ``probes`` files
    spread over the list."""
    if not old_root.is_dir():
        return  # moved
    for i in sorted({round(k * (len(lines) - 1) / max(probes - 1, 1)) for k in range(probes)}):
        rel = _path_of(lines[i])
        before, now = old_root / rel, new_root / rel
        if before.is_file() and (before.stat().st_size != now.stat().st_size or _sha256(before) != _sha256(now)):
            raise UserError(f"{out} holds the latents of {old_root}, not of {new_root}: the file names are the "
                            f"same, but {rel} differs between them (another folder, not a move)",
                            suggestion=f"use a new --out for {new_root}, or pass {old_root} to finish or update it")


def _refuse_foreign_files(out: Path, text: bytes, planned: bool) -> None:
    """Refuse an ``out`` that holds shards zoo prepare-latents did not write (with or without a plan:
    the run would replace or delete them) or, without a plan, a manifest or image list it did not
    write. Its own files (a plan deleted to move the image folder, then perhaps damaged) are kept
    and reused; ``text`` is the ``images.txt`` this run writes (the same bytes replace nothing: a
    run killed before it wrote its plan)."""
    def our_shard(path: Path) -> bool:
        meta = _shard_metadata(path)
        return meta is None or meta.get("format") == FORMAT  # None: a damaged shard of ours, encoded again

    def our_manifest(path: Path) -> bool:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged: written again at the end
            return True
        return isinstance(payload, dict) and payload.get("format") == FORMAT

    shards = sorted(p for p in out.glob("shard_*.safetensors") if SHARD_NAME.fullmatch(p.name))
    foreign = [p.name for p in shards if not our_shard(p)]
    if not planned and len(foreign) == len(shards):  # no shard of ours here to vouch for the manifest and the list
        manifest, images = out / MANIFEST, out / IMAGES
        foreign += [MANIFEST] * (manifest.is_file() and not our_manifest(manifest))
        foreign += [IMAGES] * (images.is_file() and images.read_bytes() != text)
    if foreign:
        raise UserError(f"--out {out} holds {some_of(foreign)}, which zoo prepare-latents did not write"
                        f"{'' if planned else f' (and no {PLAN})'}; encoding there would replace or delete "
                        f"{'them' if len(foreign) > 1 else 'it'}", suggestion="move them out of --out, or give a new "
                        "or empty --out directory")


def _shard_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata of shard ``path``, or ``None`` where it is missing or not whole."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return None


def shard_is_current(path: Path, digest: tuple[str, str], planned: bool = False) -> bool:
    """Whether ``path`` is a whole shard holding the rows and made with the settings of ``digest``
    (:func:`shard_digests`): a plan deleted and a rerun with another VAE kept the old latents.

    A shard from before shards carried their settings is taken on its rows where the plan it was
    written under is still there (``planned``: its settings were checked against this run's).
    """
    meta = _shard_metadata(path) if path.is_file() else None
    if meta is None or meta.get("rows_sha256") != digest[0]:
        return False
    settings = meta.get("settings_sha256")
    return settings == digest[1] or (settings is None and planned)


def write_shard(path: Path, mean: Tensor, std: Tensor, labels: Tensor, start: int, dtype: torch.dtype,
                digest: tuple[str, str]) -> None:
    """One shard, atomically (a temporary name, then a rename)."""
    from zoo.atomic import write_file
    from zoo.weights import save_reproducibly

    tensors = {"mean": mean.to(dtype).contiguous(), "std": std.to(dtype).contiguous(), "labels": labels.long()}
    meta = {"format": FORMAT, "start": str(start), "scaled": "false", "rows_sha256": digest[0],
            "settings_sha256": digest[1]}
    write_file(path, lambda tmp: save_reproducibly(tmp, tensors, meta))  # a resumed run: the same bytes


def finish(out: Path, plan: dict, digests: list[tuple[str, str]], planned: bool = False) -> bool:
    """Write ``manifest.json`` if every shard is on disk and current; return whether it is complete.

    Shards past the plan's last one (the image list shrank) are deleted first.
    """
    from zoo.atomic import file_leftovers, remove_file_leftovers

    shards = []
    for k in range(plan["num_shards"]):
        if not shard_is_current(out / shard_name(k), digests[k], planned):
            return False
        start = k * plan["shard_size"]
        shards.append({"file": shard_name(k), "start": start,
                       "num_images": min(plan["shard_size"], plan["num_images"] - start)})
    # Shards the plan no longer has, and killed writes of them: no process writes those now.
    written = {p.name for p in out.glob("shard_*.safetensors")} | set(file_leftovers(out))
    for name in {n for n in written if SHARD_NAME.fullmatch(n)} - {s["file"] for s in shards}:
        (out / name).unlink(missing_ok=True)
        remove_file_leftovers(out / name)
    _write_json(out / MANIFEST, {**plan, "shards": shards})
    return True


def prepare_latents(image_dir: str | Path, vae_dir: str | Path, out: str | Path, resolution: int = 256,
                    batch_size: int = 32, shard_size: int = 10000, num_workers: int = 4, dtype: str = "float32",
                    device: str | None = None, rank: int = 0, world: int = 1,
                    progress: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None) -> bool:
    """Encode the shards of ``image_dir`` that rank ``rank`` of ``world`` owns and are not on disk yet.

    ``log`` gets (rank 0) the VAE weights file read, then one line saying what was found and what is
    left to encode. ``num_workers`` decoding processes are started, no more than there are batches
    to read (a note says so). Returns whether the output is complete (``manifest.json`` written).
    """
    from zoo.atomic import remove_file_leftovers

    root, out = Path(image_dir).expanduser(), Path(out).expanduser()
    fresh = not any(out.glob("shard_*.safetensors"))  # before any rank can have written one
    with reported_by_rank_0(rank):  # every rank lists the same folder and reads the same VAE: the same mistake
        images, vae, plan, lines, changed, planned = _plan(root, vae_dir, out, resolution, shard_size, dtype)
    digests = shard_digests(plan, lines)
    device = torch.device(device or "cpu")
    vae = vae.to(device)
    mine = range(rank, plan["num_shards"], world)
    todo = [k for k in mine if not shard_is_current(out / shard_name(k), digests[k], planned)]
    total = sum(min(shard_size, len(images) - k * shard_size) for k in todo)
    reads = sum(-(-min(shard_size, len(images) - k * shard_size) // batch_size) for k in todo)  # batches
    workers = min(num_workers, reads)  # a worker reads whole batches: more would only be forked and ended
    with _shards_locked(out, todo):  # held to the end: another run writing the same shards stops here
        for k in todo:  # locked: no other process writes these shards, so what a killed run left is stale
            remove_file_leftovers(out / shard_name(k))
        if log is not None:
            n = plan["num_shards"]
            if rank == 0:  # which file of a --vae folder holding several
                log(f"VAE weights {plan['vae']['weights']}")
            if changed:
                log(f"the images under {root} changed since {out} was started: the shards whose images are the same "
                    "are kept, the others encoded again")
            who = f"rank {rank} of {world}: " if world > 1 else ""
            left = (f"{who}encoding {len(todo)} ({_count(total, 'image')}) on {device}" if todo
                    else f"{who}none left to encode")
            log(f"{_count(len(images), 'image')} in {_count(len(images.classes), 'class')} under {root}; "
                f"{_count(n, 'shard')} of up to {shard_size} in {out}, {left}")
            if workers < num_workers:
                log(f"note: {_count(reads, 'batch')} of images to read, so {_count(workers, 'worker')} of the "
                    f"--workers {num_workers}")
            if rank == 0 and images.skipped_note():
                log(f"note: {images.skipped_note()}")
            decoded = _plan_decoding(out)
            if rank == 0 and decoded != IMAGE_DECODING:
                log(f"note: {out} was started by a zoo that read images another way (before 2026-12-07: "
                    "transparency, 16-bit PGMs and float TIFFs): its shards keep those pixels; encode into a new "
                    "--out if the folder holds such images")
            if rank == 0 and world > n and fresh:
                idle = world - n
                log(f"note: {_count(n, 'shard')} for {world} processes, so {idle} of them "
                    f"{'has' if idle == 1 else 'have'} nothing to encode; --shard-size {-(-len(images) // world)} "
                    "gives each process one")
        bar = (progress(total=total, unit="img", desc=f"rank {rank}" if world > 1 else "encode")
               if progress and total else None)  # no empty bar for a finished output
        try:
            _encode(images, vae, device, out, todo, digests, shard_size, batch_size, workers,
                    getattr(torch, dtype), bar)
        finally:  # the bar's last line ends before any error message is printed
            if bar is not None:
                bar.close()
        return finish(out, plan, digests, planned)


def _encode(images, vae: nn.Module, device: torch.device, out: Path, todo: list[int], digests: list[tuple[str, str]],
            shard_size: int, batch_size: int, num_workers: int, dtype: torch.dtype, bar) -> None:
    """Encode and write shards ``todo``, each when its last batch arrives.

    One DataLoader reads them all, its batches never crossing a shard, so the workers are forked
    once: a Ctrl-C that landed while the next shard's workers forked was lost (the run went on).
    The workers ignore SIGINT and SIGTERM (the process group's signal): one that died of it was a
    'DataLoader worker exited unexpectedly' traceback instead of the main process's clean stop.
    """
    from torch.utils.data import DataLoader

    from zoo.training.data_workers import end_workers, workers_ignore_stop_signals

    batches, ends = [], {}  # ends: the index of each shard's last batch -> the shard
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, len(images))
        batches += [range(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
        ends[len(batches) - 1] = k
    if not batches:
        return
    loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers,
                        worker_init_fn=workers_ignore_stop_signals)
    it, means, stds, labels = None, [], [], []
    try:
        with _interrupts_held():
            it = iter(loader)  # forks the workers
        for i, (x, y) in enumerate(_resumable_errors(it)):  # one line, not a worker's traceback
            mean, std = encode_moments(vae, x.to(device))
            _check_finite(mean, std, dtype, [images.items[j][0] for j in batches[i]])
            means.append(mean.cpu())
            stds.append(std.cpu())
            labels.append(y)
            if bar is not None:
                bar.update(len(y))
            if i in ends:
                k = ends[i]
                write_shard(out / shard_name(k), torch.cat(means), torch.cat(stds), torch.cat(labels),
                            k * shard_size, dtype, digests[k])
                means, stds, labels = [], [], []
    finally:  # end the workers now, not when the iterator is collected: an error's traceback keeps it
        # (a cycle), and at exit multiprocessing's SIGTERM (which they ignore) and join() then hung
        end_workers(it)


def _check_finite(mean: Tensor, std: Tensor, dtype: torch.dtype, paths: list[Path]) -> None:
    """Refuse moments that are NaN or infinite once stored in ``dtype``: training on them stopped
    later with a non-finite loss that named the learning rate, not the image."""
    finite = torch.isfinite(mean.to(dtype)).flatten(1).all(1) & torch.isfinite(std.to(dtype)).flatten(1).all(1)
    if not bool(finite.all()):
        bad = paths[int((~finite).nonzero()[0])]
        raise UserError(f"the VAE gave NaN or infinite latents for image {bad}" + " (stored as "
                        f"{str(dtype).removeprefix('torch.')})" * (dtype != torch.float32),
                        suggestion="check that image and the VAE weights; with --dtype float16, try float32")


@contextlib.contextmanager
def _interrupts_held():
    """Hold a Ctrl-C (SIGINT) or SIGTERM that comes during the block and deliver it after.

    While a DataLoader forks its workers, a KeyboardInterrupt raised in an at-fork hook (logging's)
    was printed as 'Exception ignored' and lost, and a child it reached before its
    ``worker_init_fn`` ran died of it; a child inherits this handler, which only records.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


LOCK = ".zoo-prepare-latents.lock"  # byte k locked: a process is writing shard k


@contextlib.contextmanager
def _shards_locked(out: Path, shards: list[int]):
    """Hold a POSIX record lock on byte k of ``OUT/.zoo-prepare-latents.lock`` for each shard k to write.

    Two runs into one ``--out`` deleted each other's temporary shard files (each takes what it
    finds for a killed run's). The ranks of one torchrun run write disjoint shards, so they never
    meet here; another run writing any of them is refused. The kernel drops the locks when the
    process ends however it ends; the file stays (deleting it would let a third run lock another
    file while this one still writes). Without ``fcntl``, or on a file system without locks, unlocked.
    """
    try:
        import fcntl

        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666) if shards else None
    except (ImportError, OSError):
        fd = None
    try:
        for k in shards if fd is not None else ():
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, k)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds shard k
                raise UserError(f"another zoo prepare-latents is writing {out} ({shard_name(k)}); two runs there "
                                "would delete each other's shards as they are written",
                                suggestion="wait for it to end, or choose another --out") from None
            except OSError:  # a file system without record locks (some network mounts): run unlocked
                break
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops every lock this process holds on the file


def _plan(root: Path, vae_dir: str | Path, out: Path, resolution: int, shard_size: int, dtype: str):
    """The images, the VAE, the plan and ``images.txt`` lines of a run, whether the image list changed
    since ``out`` was started and whether its plan was there; every check that can refuse the run
    before encoding."""
    from zoo.training.data import ImageFolder

    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"image folder {root} {what}", suggestion="pass IMAGE_DIR laid out as IMAGE_DIR/CLASS/*.JPEG")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", suggestion="give a directory for the shards (new or an earlier --out)")
    _check_outside(root, out)
    _check_ours(out)
    images = ImageFolder(root, resolution)
    if len(images) == 0:
        if not images.classes:
            flat = ImageFolder(root, resolution, flat=True).items  # images in IMAGE_DIR itself
            raise UserError(f"{root} has no class subfolders" + (f": its {_count(len(flat), 'image')} lie in it" if flat
                            else ""), suggestion="lay it out as IMAGE_DIR/CLASS/*.JPEG" + (
                                f" (for one class, move them into e.g. {root / 'all'}/)" if flat else ""))
        n, others = len(images.classes), len(images.skipped_files)
        raise UserError(f"the {_count(n, 'class folder')} under {root} hold{'s' * (n == 1)} no images: "
                        f"{ImageFolder.skipped(others, 'there')}", suggestion="convert them to one of these formats"
                        if others else "lay it out as IMAGE_DIR/CLASS/*.JPEG")
    vae, identity = load_encoder(vae_dir)
    if resolution % identity["downsample"]:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling {identity['downsample']}")
    lines = image_lines(root, images.items)
    plan = make_plan(root, images.classes, lines, resolution, shard_size, identity, dtype)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err.strerror}") from None
    planned = (out / PLAN).is_file()  # a plan there that check_or_write_plan accepts has these settings
    changed = check_or_write_plan(out, plan, lines)
    return images, vae, plan, lines, changed, planned


def _check_ours(out: Path) -> None:
    """Refuse an existing ``out`` that holds files other than a zoo prepare-latents output's (a user's folder,
    a zoo train run): the shards went in beside them, and a later data.root there reads only the shards."""
    from zoo.atomic import is_leftover

    if not out.is_dir() or (out / PLAN).is_file():  # new, or an earlier --out (its plan says which)
        return
    ours = {PLAN, MANIFEST, IMAGES, LOCK}
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ours and not SHARD_NAME.fullmatch(p.name) and not is_leftover(p.name))
    if foreign:
        raise UserError(f"--out {out} holds files that are not a zoo prepare-latents output ({some_of(foreign)})",
                        suggestion="give a new or empty directory for the shards")


def _check_outside(root: Path, out: Path) -> None:
    """Refuse an ``out`` that is ``root`` or inside it: the first run worked, but its rerun (the
    resume) listed the shards' folder as a class folder without images and stopped."""
    real_root, real_out = root.resolve(), out.resolve()
    if real_out != real_root and real_root not in real_out.parents:
        return
    if real_out == real_root:
        why, move = "is the image folder: the shards would lie among its class folders", ""
    else:
        why = f"is inside the image folder {root}: a rerun would list it with the images (as a class folder)"
        move = f" (move {out} there to keep its shards)" if (out / PLAN).is_file() else ""
    raise UserError(f"--out {out} {why}", suggestion=f"give an --out outside the image folder{move}")


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 image", "3 images", "2 classes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'ch')) else 's'}"


def _resumable_errors(batches):
    """The batches; an unreadable image's error also says that the shards written so far are kept."""
    from zoo.training.data import BAD_IMAGE_HINT
    from zoo.training.data_workers import one_line_errors

    try:
        yield from one_line_errors(batches)
    except UserError as err:
        if err.message.startswith("cannot read image"):
            err.suggestion = f"{BAD_IMAGE_HINT}, then run the same command again: the shards written so far are kept"
        raise
