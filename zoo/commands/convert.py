"""``zoo convert FAMILY IN.pt --recipe R.yaml --out DIR``: an official checkpoint as a zoo checkpoint."""

from __future__ import annotations

import argparse
import pathlib
from pathlib import Path

from zoo.commands import add_overrides_option, add_weights_option
from zoo.errors import UserError
from zoo.guards import user_path
from zoo.jsonfile import read_json_object


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an official DiT / U-ViT / DiMR checkpoint into a zoo checkpoint",
        description="Load an official state dict (raw, or under 'ema' / 'model'), convert it to the zoo "
        "layout, load it strictly into the recipe's model and save a checkpoint directory.",
    )
    p.add_argument("family", help="model family of the official checkpoint (dit, uvit, dimr)")
    p.add_argument("checkpoint", type=user_path, help="official checkpoint (.pt / .pth, or a .safetensors state dict)")
    p.add_argument("--recipe", required=True, help="zoo recipe whose model matches the checkpoint")
    p.add_argument("--out", required=True, type=user_path,
                   help="checkpoint directory to write (a new path, or an empty directory)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it already is a zoo checkpoint (nothing else is ever replaced)")
    add_overrides_option(p)
    p.add_argument("--config", type=user_path, default=None,
                   help="JSON file with the official constructor kwargs, for families whose converter needs "
                   "them (DiMR); default: the checkpoint's own 'config' entry, else read from --recipe")  # fmt: skip
    add_weights_option(p, "model", "which weights of a training checkpoint to take (default: ema if present)")
    p.set_defaults(func=run)


def load_official(path: Path) -> object:
    """An official checkpoint file, read with ``weights_only=True``.

    DiT's training checkpoints also store the script's ``argparse.Namespace`` under ``args``;
    that class (plain attributes, no code) and pathlib's paths are the only ones allowed besides
    tensors and containers.
    A ``.safetensors`` file is read as such (a cut one is "not a complete safetensors file", not
    "not a torch file", whatever the installed torch.load makes of it).
    """
    from zoo.torchfile import starts_like_torch, torch_load_plain

    if path.is_dir():
        _refuse_a_folder(path)
    if path.is_file() and ((path.suffix == ".safetensors" and not starts_like_torch(path))
                           or _starts_like_safetensors(path)):  # a torch file named .safetensors is read as one
        from zoo.weights import load_weights

        return load_weights(path)
    # paths inside args (a training script's --data-path as a pathlib.Path) are plain data too
    return torch_load_plain(path, "checkpoint", allowed=[argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
                                                          pathlib.PurePosixPath, pathlib.PureWindowsPath])


def _starts_like_safetensors(path: Path) -> bool:
    """Whether a file (whatever its suffix: ``weights.pt``) starts as safetensors does: an 8-byte
    little-endian header length that fits the file, then the JSON header's ``{``."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _refuse_a_folder(path: Path) -> None:
    """A folder is not a checkpoint file; name the weights files in it (U-ViT saves ``300000.ckpt/``, a folder
    holding ``nnet.pth`` and ``nnet_ema.pth``), the EMA ones first. A zoo checkpoint or run directory needs no
    conversion: naming its weights file would lead to that file's refusal."""
    from zoo.checkpoint import is_checkpoint

    if is_checkpoint(path) or is_checkpoint(path / "last"):
        raise UserError(f"{path} is a zoo {'checkpoint' if is_checkpoint(path) else 'run directory'}, already in "
                        "zoo's layout", suggestion=f"pass {path} to zoo sample, eval or export; zoo convert reads "
                        "official checkpoints")
    found = sorted((f for f in path.iterdir() if f.is_file() and f.suffix in (".pt", ".pth", ".safetensors")),
                   key=lambda f: ("ema" not in f.name, -int(f.stem) if f.stem.isascii() and f.stem.isdigit() else 0, f.name))
    # EMA weights first, then the newest of numbered ones (DiT's checkpoints/0400000.pt), then by name
    if not found:
        raise UserError(f"checkpoint {path} is a directory holding no .pt, .pth or .safetensors file",
                        suggestion="pass the official weights file itself")
    raise UserError(f"checkpoint {path} is a directory, not a weights file; it holds "
                    + ", ".join(f.name for f in found[:5]), suggestion=f"pass {found[0]}")


def check_out(out: Path, force: bool) -> None:
    """``--out`` may be new or an empty directory; an existing zoo checkpoint only with ``--force``."""
    from zoo.checkpoint import check_replaceable, is_checkpoint
    from zoo.guards import check_outside_checkpoints, check_writable

    check_writable(out, "--out")  # a file among its parents, or a read-only disk: before the weights are read
    check_outside_checkpoints(out, itself=True)  # out itself is a checkpoint --force replaces
    check_replaceable(out, "--out")  # a file, or a directory that is not a zoo checkpoint: never replaced
    if is_checkpoint(out) and not force:
        raise UserError(f"--out {out} is already a zoo checkpoint", suggestion="pass --force to replace it")


def official_config(args: argparse.Namespace, checkpoint: object) -> dict | None:
    """The official constructor kwargs: ``--config FILE``, else the checkpoint's ``config`` entry, else None."""
    if args.config is not None:
        if not args.config.is_file():
            raise UserError(f"official config {args.config} " + ("is a directory" if args.config.is_dir() else
                            "does not exist"), suggestion="pass the official config's JSON file")
        config = read_json_object(args.config, "official config", "give a JSON object of constructor kwargs")
        for key in ("config", "_config"):  # a keys file (tests/golden/keys) carries it beside the keys
            if isinstance(config, dict) and isinstance(config.get(key), dict):
                config = config[key]
        if not isinstance(config, dict):
            raise UserError(f"{args.config} does not hold a JSON object of constructor kwargs")
        return config
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else None


def _refuse_zoo_weights(path: Path) -> None:
    """A weights file of a zoo checkpoint (``RUN/last/ema.safetensors``) needs no conversion: every
    key read as an 'unexpected key' of the official layout, naming none of this."""
    from zoo.checkpoint import checkpoint_of, is_checkpoint

    folder = path.parent
    if is_checkpoint(folder):
        run = folder.parent if checkpoint_of(folder.parent) == folder else folder
        raise UserError(f"{path} is a weights file of the zoo checkpoint {folder}, already in zoo's layout",
                        suggestion=f"pass {run} to zoo sample, eval or export; zoo convert reads official checkpoints")


def _mismatch_hint(checked: bool) -> str:
    """What to do when the converted weights do not fit the recipe's model."""
    if checked:  # the recipe agrees with the official config: the file is not that model, or not all of it
        return "check that --config is this checkpoint's config and that the file is complete"
    return ("the recipe's model differs from the checkpoint's, or the file is incomplete: use the recipe of this "
            "checkpoint's model, or pass its official config as --config to see which setting differs")


def run(args: argparse.Namespace) -> int:
    import zoo
    from zoo.api import load_model_recipe
    from zoo.checkpoint import save_checkpoint
    from zoo.weights import build_with_state
    from zoo.convert import (check_recipe_family, check_recipe_matches, check_weights, get_family, guess_family,
                             model_spec, unwrap_state_dict)
    from zoo.diffusion.setup import check_null_label
    from zoo.recipe import override_key
    from zoo.meta import build_on_meta
    from zoo.training.fit import check_recipe_fits_model

    converter = get_family(args.family)
    check_out(args.out, args.force)  # before any work: a refused --out costs nothing
    _refuse_zoo_weights(args.checkpoint)
    checkpoint = load_official(args.checkpoint)
    official = unwrap_state_dict(checkpoint, source=str(args.checkpoint), prefer=args.weights)
    check_weights(official, str(args.checkpoint))
    looks = guess_family(official)
    if looks not in (None, args.family):  # else every key is 'unexpected', naming none of the fix
        raise UserError(f"{args.checkpoint} holds {looks} weights, not {args.family} ones",
                        suggestion=f"zoo convert {looks} {args.checkpoint} --recipe A_{looks.upper()}_RECIPE ...")
    recipe = load_model_recipe(args.recipe, args.overrides)
    check_recipe_family(args.family, converter, recipe["model"], str(args.checkpoint))
    meta_model = build_on_meta(lambda: zoo.build_model(recipe))
    check_recipe_fits_model(recipe, meta_model)  # as zoo build and train do
    config = official_config(args, checkpoint)
    checked = config is not None  # an official config: settings that keep tensor shapes are compared with it
    if checked:
        check_recipe_matches(model_spec(converter, config), recipe["model"])
    elif hasattr(converter, "config_from_recipe"):  # DiMR's key layout, from the recipe of the same model
        config = converter.config_from_recipe(recipe["model"])
    try:
        state = converter.convert_state_dict(official, config)
    except KeyError as err:
        raise UserError(f"the official config lacks the key {err.args[0]!r} that converting needs") from None
    if hasattr(converter, "explain_shapes"):  # a shape that says which setting differs (DiT's pos_embed length)
        converter.explain_shapes(state, meta_model.state_dict(), recipe)
    source = f"{args.checkpoint} (converted as {args.family})"
    names = getattr(converter, "official_keys", None)  # mismatched keys named as in the official file
    model = build_with_state(lambda: zoo.build_model(recipe), state, source, suggestion=_mismatch_hint(checked),
                             rename=(lambda key: names(key, config)) if names else None)
    check_null_label(model, (recipe.get("diffusion") or {}).get("null_label"),  # else it converts, then cannot sample
                     recipe.get("data"))
    out = save_checkpoint(args.out, model, recipe)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({len(official)} official tensors, {n:,} parameters)")
    changed = [".".join(key) for key in map(override_key, args.overrides) if key[0] == "model"]
    if changed and not checked:  # no official config to compare with: shapes are all strict loading sees
        # (DiMR's config_from_recipe holds only the key layout: block kinds and depths)
        print(f"zoo convert: note: {', '.join(changed)} changed the recipe's model; a setting that keeps every "
              "tensor's shape (num_heads, an activation) cannot be checked against the weights: set it only as "
              "the checkpoint was trained")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in official.values()} - {"float32"})
    if dtypes:  # float16/bfloat16 widen exactly; float64 is rounded
        print(f"zoo convert: note: the official tensors are {', '.join(dtypes)}; the checkpoint holds them as the "
              "model's float32" + (" (rounded)" if "float64" in dtypes else " (exactly)"))
    return 0
