"""``zoo train RECIPE [--out DIR]``: train a recipe's model as its ``train`` and ``data`` sections say.

    zoo train recipes/dit_s_2.yaml --out runs/dit_s --set data.root=/data/latents --set train.batch_size=64
    zoo train recipes/dit_s_2.yaml --out runs/dit_s --resume runs/dit_s/last
    torchrun --nproc_per_node 8 -m zoo train recipes/dimr_xl_2r.yaml --out runs/dimr --set data.root=...

The run directory (``--out``; default ``runs/<recipe name>``) holds ``step_XXXXXXX/`` per save,
``last/`` (newest), ``log.jsonl``, ``loss.png``, ``tb/`` (TensorBoard), ``samples/`` and, with
``train.eval_every``, ``eval/fd_reference.npz``.
Ctrl-C saves ``last/`` and exits with 130; a non-finite loss or gradient stops the run with exit
status 1, ``last/`` still the last finite checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zoo.commands import add_overrides_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a recipe's model (checkpoints, EMA, logs, sample grids)",
                              description="Train the recipe's model; write checkpoints and logs into --out. "
                                          "Under torchrun, one process per GPU (DDP, or FSDP2 with "
                                          "--set train.parallel=fsdp).")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: the run --resume names, else runs/<recipe name>)")
    add_overrides_option(p)
    p.add_argument("--resume", default=None, metavar="DIR", help="checkpoint (or run) directory to continue from; "
                   "'auto': continue --out if it holds a run, else start it (for requeued jobs and torchrun "
                   "--max-restarts)")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume even though the recipe's model or diffusion section (in ways that keep the weights' "
                   "shapes), data.dataset or the data's classes differ from the checkpoint's")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="stop at this step (default: train.steps); the learning-rate schedule still ends at "
                        "train.steps, so a later --resume continues the same run: set train.steps for a shorter run")
    p.set_defaults(func=run)


def default_run_dir(recipe: str) -> str:
    """``runs/<recipe file name without .yaml>`` under the working directory: where ``--out`` is not given."""
    return str(Path("runs") / Path(recipe).stem)


#: Recipe keys that name files or folders.
PATH_KEYS = (("data", "root"), ("data", "vae"), ("data", "cache"), ("train", "eval_ref"), ("train", "init_from"))


def _absolute_paths(recipe: dict) -> None:
    """Relative paths are made absolute against this working directory, so the run's config.json
    names the same data, VAE and cache when zoo sample, zoo eval or --resume runs elsewhere (a
    same-named folder there would silently stand in for them). ``train.eval_ref`` may also name a
    dataset (``emoji32``): it becomes a path only where such a file or folder exists."""
    for section, key in PATH_KEYS:
        table = recipe.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or not value:
            continue
        path = os.path.expanduser(value)
        if key != "eval_ref" or os.path.exists(path):
            table[key] = os.path.abspath(path)


#: Paths a run is usually given with ``--set`` (a paper recipe names no data): a resume that leaves
#: them out takes the checkpoint's, so the README's ``--resume`` line continues the run as it was.
RESUMED_PATH_KEYS = (("data", "root"), ("data", "vae"), ("train", "eval_ref"))


def _paths_of_the_resumed_run(recipe: dict, resume: str, allow_recipe_change: bool = False) -> list[str]:
    """Fill the ``RESUMED_PATH_KEYS`` the recipe leaves unset from the checkpoint ``resume`` names;
    return a note for each. A path given again (another copy of the data) is the one used. A
    checkpoint that cannot be read here is left to the trainer, whose error names it.

    A recipe whose ``data.dataset`` is not the checkpoint's (a ``--set`` of the first start not given
    again) is refused before any data is read, naming both: the weights would go on with other images and
    other labels. ``--allow-recipe-change`` goes on with the recipe's dataset, with a note."""
    import shlex

    from zoo.checkpoint import read_config, resumed_checkpoint
    from zoo.errors import UserError
    from zoo.training.sections import data_setting

    try:
        then = read_config(resumed_checkpoint(Path(resume))[0])  # the one the trainer resumes from
    except (UserError, OSError):
        return []
    data_then = then.get("data") if isinstance(then.get("data"), dict) else {}
    data_now = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    dataset_then, dataset_now = data_setting(data_then, "dataset"), data_setting(data_now, "dataset")
    notes = []
    if dataset_then != dataset_now:
        root = f" (data.root {data_then['root']})" if data_then.get("root") else ""
        now = (f"this recipe names no dataset (the default is {dataset_now!r})" if "dataset" not in data_now
               else f"this recipe's is {dataset_now!r}")
        rootless = not data_now.get("root") and _reads_a_root(dataset_now)  # would go on to 'data.root is not set'
        if not allow_recipe_change:
            given = {"dataset": dataset_then, "root": data_then.get("root")}  # the dataset trained on, default too
            again = " ".join(f"--set {shlex.quote(f'data.{key}={value}')}" for key, value in given.items() if value)
            raise UserError(f"the checkpoint in {resume} trained on data.dataset {dataset_then!r}{root}, and {now}"
                            + ", with no data.root" * rootless, key_path="data.dataset",
                            suggestion=f"give the first start's --set options again: {again}, or pass "
                            f"--allow-recipe-change to go on with {dataset_now!r}"
                            + " and --set data.root=..." * rootless + " (its own images and labels)")
        notes.append(f"zoo train: note: --allow-recipe-change: the checkpoint trained on data.dataset "
                     f"{dataset_then!r}{root}; the run goes on with {dataset_now!r}, its images and labels")
    for section, key in RESUMED_PATH_KEYS:
        if section == "data" and dataset_then != dataset_now:  # another kind of data: the old root is not its
            continue
        old = (then.get(section) or {}).get(key) if isinstance(then.get(section), dict) else None
        if isinstance(old, str) and old and not (recipe.get(section) or {}).get(key):
            recipe[section] = {**(recipe.get(section) or {}), key: old}
            notes.append(f"zoo train: note: {section}.{key} is the checkpoint's, {old} (--set {section}.{key}=... "
                         "to read another)")
    return notes


def _reads_a_root(dataset: str) -> bool:
    """Whether the registered dataset reads ``data.root`` (synthetic and emoji32 do not; an unknown
    name is left to the trainer, whose error names it)."""
    from zoo import registry
    from zoo.errors import UserError
    from zoo.training.data import reads_root

    try:
        return reads_root(registry.get("dataset", dataset))
    except UserError:
        return False


AUTO = "auto"  # --resume auto


def _resumed_run(resume: str | None) -> str | None:
    """The run directory ``--resume`` names (itself, or the run of its ``last/`` or ``step_*/``): where a
    resume without ``--out`` continues, rather than forking into ``runs/<recipe name>``."""
    from zoo.guards import holds_a_run, run_of

    if resume is None or not Path(resume).is_dir():
        return None
    run = run_of(Path(resume))
    return str(run) if holds_a_run(run) else None


def _checked_arguments(args: argparse.Namespace) -> tuple[str, dict, str, list[str]]:
    """The run directory, the recipe, the device and notes for the run's first lines, after the checks
    that need no process group."""
    from zoo.api import load_model_recipe
    from zoo.errors import UserError
    from zoo.guards import check_run_dir, resolve_device
    from zoo.training import distributed

    from zoo.domains import MAX_STEPS

    if args.steps is not None and not 0 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps must be >= 0 and at most {MAX_STEPS:,} (as train.steps), got {args.steps}")
    device = resolve_device(args.device)
    distributed.check_launch(device)
    device = str(device)
    if args.resume == AUTO:  # one command line for the first start and every restart of the job
        from zoo.guards import holds_a_run

        args.out = args.out or default_run_dir(args.recipe)
        found = holds_a_run(Path(args.out).expanduser())  # "last/", "step_0000500/" or None
        # the run directory: its last/, or where that is gone or incomplete its newest complete step_*/
        args.resume = args.out if found else None
    if args.resume is not None:
        args.resume = str(Path(args.resume).expanduser())
    # never a file, never another run's directory; `~` expanded (the shell leaves --out=~/x alone)
    out = args.out or _resumed_run(args.resume) or default_run_dir(args.recipe)
    out = str(check_run_dir(out, resuming=args.resume or False))
    recipe = load_model_recipe(args.recipe, args.overrides)
    _absolute_paths(recipe)
    notes = _paths_of_the_resumed_run(recipe, args.resume, args.allow_recipe_change) if args.resume is not None else []
    train = recipe.get("train") or {}
    decays = train.get("lr_schedule", "constant") in ("cosine", "linear")
    if args.steps is not None and decays and args.steps > int(train.get("steps") or 0):
        raise UserError(f"--steps {args.steps} is past train.steps {train.get('steps') or '(unset: 0)'}, where the "
                        f"{train['lr_schedule']} decay ends (the steps after it would all run at train.min_lr)",
                        key_path="train.steps",
                        suggestion=f"--set train.steps={args.steps} to decay over {args.steps} steps; --steps "
                        "stops a run part-way")
    if args.steps is None and not train.get("steps"):
        raise UserError(f"{args.recipe}: train.steps is not set (or 0), so there is nothing to train",
                        key_path="train.steps", suggestion="set train.steps in the recipe, or --set train.steps=N")
    return out, recipe, device, notes


def run(args: argparse.Namespace) -> int:
    from zoo.errors import reported_by_rank_0, tracebacks_wanted
    from zoo.training import distributed
    from zoo.training.loop import NonFiniteError, train

    rank = int(os.environ.get("RANK", "0"))
    with reported_by_rank_0(rank):  # the same arguments and files on every rank: the same mistake
        out, recipe, device, notes = _checked_arguments(args)
    try:
        records = train(recipe, out, steps=args.steps, device=device, resume=args.resume,
                        allow_recipe_change=args.allow_recipe_change, notes=notes)
    except NonFiniteError as err:
        if rank == 0:  # every rank stops; one says why
            print(f"zoo train: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not distributed.peer_lost(err) or tracebacks_wanted():
            raise
        distributed.say_peer_lost(rank, err)  # (said already where the loop saw it)
        return 1
    finally:
        distributed.shutdown()
    if rank == 0:
        last = f"; last loss {records[-1]['loss']:.5f}" if records else ""
        print(f"zoo train: done; checkpoint {out}/last{last}")
    return 0
