"""Where a run's weights come from: ``--resume`` (a checkpoint's weights, optimizer, EMA and step,
checked against the recipe) and ``train.init_from`` (another run's weights, step 0).

:class:`Resuming` is the part of :class:`zoo.training.loop.Trainer` that reads checkpoints; it
relies on the trainer's ``model``, ``optimizer``, ``ema``, ``scaler``, ``recipe``, ``train``,
``classes``, ``fsdp``, ``out``, ``fd`` and ``after_banner`` (the notes printed with the run's
first lines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from zoo.atomic import REFUSED_RENAME_ERRNOS, sealed_at
from zoo.checkpoint import (CONFIG, checkpoint_of, load_trainer_state, read_classes, read_config, read_whole,
                            repair_run, resumed_checkpoint)
from zoo.weights import check_finite, check_keys, key_mismatch, load_state_dict_strict, load_weights, weights_on_meta
from zoo.errors import UserError
from zoo.training.eval_hook import fd_seed_note
from zoo.training.optim import learning_rate, recipe_groups
from zoo.training.rundir import check_resume_recipe
from zoo.training.sections import TRAIN_DEFAULTS as DEFAULTS
from zoo.training.sections import DATA_UNSET_MEANS, UNSET_MEANS


class Resuming:
    """The trainer's checkpoint reading: :meth:`_load` before the model is wrapped, :meth:`_load_state`
    once the optimizer and EMA exist, :meth:`_init_from` for ``train.init_from``."""

    def _init_from(self, path: Path) -> None:
        """``train.init_from``: a new run (step 0, fresh optimizer and schedule) whose model starts from a
        checkpoint's weights, its EMA if it has one (released and converted weights are EMA weights), and
        whose EMA starts as their copy. The weights must fit this recipe's model exactly (strict)."""
        from zoo.checkpoint import EMA as EMA_FILE
        from zoo.checkpoint import checkpoint_of, checkpoint_weights

        directory = checkpoint_of(path)
        params = {name for name, _ in self.model.named_parameters()}

        def read() -> Path:  # one save's files (a live run's last/ may be replaced meanwhile: read again)
            read_config(directory)  # a checkpoint directory, complete (an interrupted save repaired)
            weights = "ema" if (directory / EMA_FILE).is_file() else "model"
            state, source = checkpoint_weights(directory, weights, params)  # (EMA: the model's buffers)
            load_state_dict_strict(self.model, state, str(source))  # another model: one line naming the tensors
            return source

        try:
            source = read_whole(directory, read)
        except UserError as err:
            raise err.locate(key_path="train.init_from") from None
        self.after_banner.append(f"zoo train: the model starts from {source} (train.init_from; step 0, "
                                 "a fresh optimizer)")

    def _load(self, directory: Path, allow_recipe_change: bool) -> None:
        """Weights of a checkpoint, and its trainer state read and checked against this recipe
        (:meth:`_load_state` loads the optimizer, EMA and step once they exist, with collectives)."""
        from zoo.training.fsdp_checkpoint import is_sharded, optimizer_state_by_name

        # A save a kill interrupted: the newest complete checkpoint wins. Only the checkpoints: the run's
        # temporary files (a half-written loss.png) may be a live run's, whose lock run() asks for.
        try:
            repair_run(directory, files=False)
        except OSError as err:  # a read-only copy of a run, resumed into another --out: read as it is
            if err.errno not in REFUSED_RENAME_ERRNOS:
                raise
            directory = checkpoint_of(directory)  # its newest save, where it lies
        directory, note = resumed_checkpoint(directory)  # last/, or a step_*/ saved after it or complete where it is not
        if note:
            self.after_banner.append(f"zoo train: note: {note}")
        notes = len(self.after_banner)

        def read() -> None:  # every file of one save: a live run's last/ may be replaced meanwhile (then read again)
            del self.after_banner[notes:]  # a read done again says its notes once
            self._resumed_recipe = read_config(directory)  # also read by _resume_notes
            weights_file = directory / "model.safetensors"
            header = weights_on_meta(weights_file)  # shapes only: whether a changed model can take them at all
            misfit = key_mismatch(self.model.state_dict(), header) if header is not None else ""
            changes = check_resume_recipe(self._resumed_recipe, self.recipe, directory, misfit, allow_recipe_change)
            if changes:  # allowed, and still said: the weights now mean something else
                self.after_banner.append(
                    "zoo train: note: --allow-recipe-change: the recipe's " + ", ".join(
                        f"{path} ({then} -> {now})" for path, then, now in changes)
                    + " differ" + "s" * (len(changes) == 1)
                    + " from the checkpoint's; its weights go on under the recipe's")
            self._check_classes(read_classes(directory), directory, allow_recipe_change)
            weights = load_weights(weights_file)
            check_finite(weights, str(weights_file))  # a file changed since: not "lower train.lr"
            load_state_dict_strict(self.model, weights, str(directory))
            sharded = is_sharded(directory)  # then the moments are in the shards, matched by parameter name
            state = load_trainer_state(directory, required=() if sharded else ("optimizer",))
            if not sharded:
                # read and checked here, where a mistake stops every rank with one line
                self._resumed_ema = load_weights(directory / "ema.safetensors")
                check_finite(self._resumed_ema, str(directory / "ema.safetensors"))
                check_keys(dict(self.model.named_parameters()), self._resumed_ema, str(directory / "ema.safetensors"))
                now = [len(g["params"]) for g in recipe_groups(self.model, self.train)]
                _check_groups(state["optimizer"], now, directory)
                if self.fsdp:  # FSDP loads a whole optimizer state keyed by name
                    state["optimizer"] = optimizer_state_by_name(state["optimizer"])
            self._resumed_state = state

        read_whole(directory, read)
        self._resumed_from = directory

    def _check_classes(self, then: list[str], directory: Path, allow_recipe_change: bool) -> None:
        """Refuse a resume whose data names its labels otherwise than the checkpoint's training did: a
        class folder added to an image folder shifts every later label, silently retargeting the
        class embeddings (``--allow-recipe-change`` goes on, with a note)."""
        if not then or not self.classes or then == self.classes:
            return
        added = [c for c in self.classes if c not in then]
        removed = [c for c in then if c not in self.classes]
        moved = next((c for c in then if c in self.classes and then.index(c) != self.classes.index(c)), None)
        what = "; ".join(filter(None, [
            f"{len(added)} new ({', '.join(added[:3])}{', ...' * (len(added) > 3)})" if added else "",
            f"{len(removed)} gone ({', '.join(removed[:3])}{', ...' * (len(removed) > 3)})" if removed else "",
            f"{moved} was label {then.index(moved)}, is now {self.classes.index(moved)}" if moved else ""]))
        message = (f"the data's classes differ from those {directory} was trained with ({len(then)} then, "
                   f"{len(self.classes)} now: {what})")
        if allow_recipe_change:
            self.after_banner.append(f"zoo train: note: --allow-recipe-change: {message}; training goes on "
                                     "with the data's labels")
            return
        raise UserError(message, key_path="data.root",
                        suggestion="restore the data as it was (move added folders such as .ipynb_checkpoints "
                        "out), or pass --allow-recipe-change to go on with the new labels")

    def _load_state(self, directory: Path) -> None:
        """The optimizer moments, EMA, scaler and step of the checkpoint :meth:`_load` read (every rank calls)."""
        from zoo.training.fsdp_checkpoint import is_sharded, load_sharded

        state = self._resumed_state
        del self._resumed_state  # the moments are copied into the optimizer: not kept twice
        settings_now = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if is_sharded(directory):  # an FSDP run's shards, read onto this run's processes (FSDP or not)
            load_sharded(directory, self.model, self.optimizer, self.ema, state)
        elif self.fsdp:  # a consolidated state, re-sharded onto this run's processes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            self._load_ema(directory)
            # An empty state (a step-0 checkpoint) is a fresh optimizer, which this one already is;
            # loading it would first step every parameter once at lr 0 to create the state, and the
            # step counts left at 1 would change the bias corrections of the next updates.
            if state["optimizer"]["state"]:
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
        else:
            self._load_ema(directory)
            self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, settings_now):
            group.update(settings)  # the moments are the checkpoint's; weight_decay, betas, eps the recipe's
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.created = [int(s) for s in state.get("created", [])]
        self.after_banner.append(f"zoo train: resumed from {directory} at step {self.step}")
        self._resume_notes()

    def _load_ema(self, directory: Path) -> None:
        """The EMA shadows :meth:`_load` read, loaded strictly (a wrong shape is never broadcast)."""
        self.ema.load_state_dict(self._resumed_ema, str(directory / "ema.safetensors"))
        del self._resumed_ema

    def _resume_notes(self) -> None:
        """Say what a resume changes that the user may not expect: a learning-rate schedule stretched
        over another ``train.steps``, and checkpoints of a continuation this run branches away from."""
        then = {**DEFAULTS, **(self._resumed_recipe.get("train") or {})}
        lr_then, lr_now = learning_rate(then, self.step), learning_rate(self.train, self.step)
        if abs(lr_now - lr_then) > 1e-3 * max(lr_then, 1e-30):
            schedule = self.train.get("lr_schedule", "constant")
            unset = {**DEFAULTS, **UNSET_MEANS}
            causes = [f"train.{key} {then.get(key, unset[key])} -> {self.train.get(key, unset[key])}"
                      for key in ("lr", "steps", "warmup_steps", "lr_schedule", "min_lr")
                      if then.get(key, unset[key]) != self.train.get(key, unset[key])]
            self.after_banner.append(
                f"zoo train: note: the learning rate at step {self.step + 1} is {lr_now:.3g}, where the checkpoint's "
                f"recipe would give {lr_then:.3g} ({', '.join(causes)}: the {schedule} schedule is recomputed for the "
                "new settings)")
        changed = _changed_keys(self._resumed_recipe, self.recipe, ("train", "data"))
        if changed:  # e.g. a `--set` of the first start not given again
            self.after_banner.append(
                "zoo train: note: the recipe differs from the checkpoint's in " + ", ".join(
                    f"{key} ({old!r} -> {new!r})" for key, old, new in changed[:6])
                + f" and {len(changed) - 6} more" * (len(changed) > 6) + "; the run goes on with the recipe's")
        if self.fd is not None:
            note = fd_seed_note(self._resumed_from.parent, self._resumed_recipe, self.recipe, self.step)
            if note:
                self.after_banner.append(note)
        later = sorted((d.name for d in self.out.glob("step_*") if d.is_dir() and d.name[5:].isdigit()
                        and int(d.name[5:]) > self.step), key=lambda name: int(name[5:]))
        if later:
            self.after_banner.append(
                f"zoo train: note: {', '.join(later)} in {self.out} come after step {self.step}, from the run this "
                "one branches away from; they are kept (and not pruned) until this run saves those steps")

    def _resumed_in_place(self) -> bool:
        """Whether this run continues a checkpoint of its own directory (not one of another run, copied
        or branched into a new ``--out``)."""
        start = getattr(self, "_resumed_from", None)
        return start is not None and start.resolve().parent == self.out.resolve()

    def _branches_away(self) -> bool:
        """Whether this run continues a checkpoint of its directory older than the newest one there (a
        step_*/ before last/): the newest still holds the continuation that log.jsonl's later records
        describe. Resumed from the newest, those records are a killed process's, no checkpoint's."""
        start = getattr(self, "_resumed_from", None)
        if not self._resumed_in_place():
            return False
        when = sealed_at(start, CONFIG)
        return any(sealed_at(d, CONFIG) > when for d in [self.out / "last", *self.out.glob("step_*")] if d != start)



def _changed_keys(then: dict, now: dict, sections: Sequence[str]) -> list[tuple[str, object, object]]:
    """``(section.key, then, now)`` for the top-level keys of ``sections`` whose values differ
    (``train`` and ``data`` keys compared with their defaults filled in)."""
    changed = []
    for section in sections:
        fill = {"train": {**DEFAULTS, **UNSET_MEANS}, "data": DATA_UNSET_MEANS}.get(section, {})
        a = {**fill, **(then.get(section) or {})}
        b = {**fill, **(now.get(section) or {})}
        changed += [(f"{section}.{key}", a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
                    if a.get(key) != b.get(key)]
    return changed


def _check_groups(saved: dict, now: list[int], directory: Path) -> None:
    """The checkpoint's optimizer splits the parameters into groups of the sizes ``now`` this recipe's
    does (one line if not: the moments would belong to other parameters, or FSDP fail to match them)."""
    then = [len(g["params"]) for g in saved.get("param_groups", [])]
    if then != now:
        raise UserError(f"the optimizer state in {directory} groups the parameters as {then}, this recipe as {now}: "
                        f"train.no_weight_decay_1d differs from the checkpoint's", key_path="train.no_weight_decay_1d",
                        suggestion="resume with the checkpoint's setting, or start a new run from its weights "
                        f"with --set train.init_from={directory}")
