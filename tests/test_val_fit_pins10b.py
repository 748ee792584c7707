"""Pins for the validation loss (zoo/training/val_loss.py), the per-sample training draws
(zoo/training/draws.py), the training objective's label dropout (zoo/training/fit.py), the run lock
(zoo/training/runlock.py) and the run directory (zoo/training/rundir.py) that a round of mutation testing
could change with no test failing. Each test names the wrong behaviour it guards against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import zoo
from zoo.training.data import synthetic_dataset
from zoo.training.val_loss import ValLoss

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 synthetic pixels, 4 classes

pytestmark = pytest.mark.usefixtures("one_thread")


def _val_hook(n: int) -> tuple[ValLoss, torch.nn.Module]:
    from zoo.diffusion.setup import build_objective

    recipe = zoo.load_recipe(RECIPE, [f"train.val_n={n}", "data.size=10"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double()
    dataset = synthetic_dataset((3, 8, 8), 10, 4, seed=0)
    dataset = TensorDataset(dataset.tensors[0].double(), dataset.tensors[1])
    return ValLoss(recipe, recipe["train"], dataset, (3, 8, 8), build_objective(recipe), torch.device("cpu")), model


def test_the_validation_loss_runs_the_model_in_eval_mode_and_restores_its_mode():
    """A model handed over in train mode (dropout, drop-path, or DiT's own label dropout) is evaluated in eval
    mode, so the loss is the same number every time; its modes are restored after. In train mode DiT's
    embedder dropped labels at random inside the 'fixed' evaluation."""
    hook, model = _val_hook(16)
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append({m.training for m in module.modules()}))
    first = hook(model, step=1)["val_loss"]
    assert seen and all(modes == {False} for modes in seen)
    assert all(m.training for m in model.modules())  # restored
    model.eval()
    assert hook(model, step=1)["val_loss"] == first


class _Drawing(torch.utils.data.Dataset):
    """4 items that draw per read, as prepared latents do: from the key given (``keyed``), else the global RNG."""

    def __init__(self, keyed: bool):
        self.keyed_draws, self.reads = keyed, []

    def __len__(self):
        return 4

    def __getitem__(self, item):
        index, key = item if isinstance(item, tuple) else (item, None)
        self.reads.append((index, key))
        gen = torch.Generator().manual_seed(key) if key is not None else None
        return torch.randn((3, 8, 8), generator=gen, dtype=torch.float64), index % 4


def _drawing_hook(n: int, keyed: bool) -> tuple[ValLoss, torch.nn.Module, _Drawing]:
    from zoo.diffusion.setup import build_objective

    recipe = zoo.load_recipe(RECIPE, [f"train.val_n={n}"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double().eval()
    data = _Drawing(keyed)
    return ValLoss(recipe, recipe["train"], data, (3, 8, 8), build_objective(recipe), torch.device("cpu")), model, data


def test_an_image_used_by_several_triples_gets_one_fixed_key():
    """val_n 8 over 4 images: triples j and j + 4 read image j with the same key, i.e. the same latent sample of
    it. A key per triple gave each repeat of an image another VAE posterior sample, so the validation set was
    not the images it names but a mix of draws."""
    hook, model, data = _drawing_hook(8, keyed=True)
    hook(model, step=0)
    assert [index for index, _ in data.reads] == [0, 1, 2, 3, 0, 1, 2, 3]
    keys = [key for _, key in data.reads]
    assert None not in keys and keys[:4] == keys[4:] and len(set(keys[:4])) == 4


def test_the_validation_loss_leaves_the_global_rng_as_it_was_with_a_dataset_that_draws_from_it():
    """A dataset that draws its augmentations from the global RNG reads it during the evaluation; without the
    fork, the training batches after each val_every step got other draws than a run without validation."""
    hook, model, data = _drawing_hook(8, keyed=False)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    hook(model, step=0)
    assert data.reads and torch.equal(torch.get_rng_state(), rng)


def _objective(*overrides):
    from zoo.training.fit import training_objective

    recipe = zoo.load_recipe(RECIPE, list(overrides))
    with torch.device("meta"):
        model = zoo.build_model(recipe)
    return training_objective(recipe, model)


def test_a_dit_that_drops_labels_has_the_trainer_drop_them_at_its_rate():
    """DiT's embedder is kept in eval mode in training; its class_dropout_prob is the trainer's label-drop rate.
    Left at the objective's 0, no label is ever dropped and classifier-free guidance has no null row trained."""
    objective = _objective("model.class_dropout_prob=0.25", "diffusion.label_drop=0.25")
    assert objective.label_drop == 0.25 and objective.null_label == 4


def test_a_null_label_the_recipe_names_is_kept_for_a_dit_that_drops_labels():
    """diffusion.null_label names the row labels are dropped to (3: data of 2 classes in a 4-class table); only
    an unset one defaults to num_classes. Overwritten, guidance samples with another row than the one trained."""
    objective = _objective("data.num_classes=2", "diffusion.null_label=3")
    assert objective.null_label == 3 and objective.label_drop == 0.1


def test_the_run_lock_names_its_holder_over_a_longer_leftover_pid(tmp_path):
    """A killed run leaves its lock file (the kernel drops the lock, not the file). The next holder's pid is
    written over it whole: without emptying the file first, '4242\\n' over '99999999\\n' read '4242\\n999', and a
    second run was told another process than the live one; the file is deleted on release."""
    import os

    from zoo.errors import UserError
    from zoo.training.runlock import LOCK_FILE, RunLock

    (tmp_path / LOCK_FILE).write_text("9" * 20 + "\n")  # a leftover of a killed run, longer than any pid
    live = RunLock(tmp_path)
    live.acquire()
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=f"another zoo train \\(pid {os.getpid()}\\) is writing"):
            RunLock(tmp_path).acquire()
    finally:
        live.release()
    assert not (tmp_path / LOCK_FILE).exists()
