"""``train.val_every``: the recipe's loss of the EMA weights on fixed (image, time, noise) triples of
held-out images, logged like the FD, without changing the training losses."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import zoo
from zoo.errors import UserError
from zoo.seeds import sample_seed
from zoo.training import train
from zoo.training.data import held_out, synthetic_dataset
from zoo.training.val_loss import VAL_STREAM, ValLoss, stratified_times

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 synthetic pixels, 4 classes
SETTINGS = ["train.log_every=1", "train.sample_every=0", "train.ckpt_every=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_val_loss_is_logged_every_n_steps_and_the_losses_do_not_change(tmp_path):
    lines = []
    train(zoo.load_recipe(RECIPE, SETTINGS + ["train.val_every=2", "train.val_n=40"]), tmp_path / "val", steps=4,
          log=lines.append)
    train(zoo.load_recipe(RECIPE, SETTINGS), tmp_path / "plain", steps=4, log=lambda *_: None)

    records = _records(tmp_path / "val")
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in vals)
    assert all(r["val_n"] == 40 and r["val_source"] == "synthetic:train (40 images)" for r in vals)
    # Same losses bit for bit: the validation draws come from generators of their own.
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in _records(tmp_path / "plain")]
    assert sum(" val_loss " in line for line in lines) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "val" / "tb"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("eval/val_loss")] == \
        [(r["step"], r["val_loss"]) for r in vals]  # TensorBoard stores float32: 1e-6 relative covers its rounding


def test_val_loss_falls_as_the_model_learns(tmp_path):
    """The EMA weights are what is measured: a constant would mean the initial weights (or none) were."""
    settings = ["train.val_every=5", "train.val_n=64", "train.log_every=5", "train.lr=3e-3", "train.ema_decay=0.5"]
    train(zoo.load_recipe(RECIPE, SETTINGS + settings), tmp_path / "run", steps=30, log=lambda *_: None)
    vals = [r["val_loss"] for r in _records(tmp_path / "run") if "val_loss" in r]
    assert len(vals) == 6
    assert all(b < a for a, b in zip(vals, vals[1:])) and vals[-1] < 0.5 * vals[0]  # here 0.93 -> 0.15


def _hook(n: int, images: int = 10) -> tuple[ValLoss, torch.nn.Module]:
    from zoo.diffusion.setup import build_objective

    recipe = zoo.load_recipe(RECIPE, [f"train.val_n={n}", f"data.size={images}"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double().eval()
    dataset = synthetic_dataset((3, 8, 8), images, 4, seed=0)
    dataset = TensorDataset(dataset.tensors[0].double(), dataset.tensors[1])
    return ValLoss(recipe, recipe["train"], dataset, (3, 8, 8), build_objective(recipe), torch.device("cpu")), model


def test_val_loss_is_the_objective_on_the_documented_draws():
    """Triple j: image j mod 10, the j-th stratified time, noise from generator (seed, j), no label dropped;
    evaluated here one triple at a time in float64, so any batching of the hook must give the same mean."""
    n = 70  # more than one pass over the 10 images, and not a multiple of the hook's batch
    hook, model = _hook(n)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rec = hook(model, step=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    assert rec["step"] == 7 and rec["val_n"] == n and rec["val_source"] == "synthetic:train (10 images)"

    total = 0.0
    with torch.no_grad():
        for j in range(n):
            x, y = hook.images[j % 10]
            noise = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(sample_seed(0, j, VAL_STREAM)))
            draws = (hook.times[j : j + 1], noise[None].double(), torch.ones(1))
            total += float(hook.objective(model, x[None], torch.tensor([y]), draws=draws)["loss"].sum())
    assert rec["val_loss"] == pytest.approx(total / n, rel=1e-12)  # float64 both ways: only summation order differs
    assert hook(model, step=8)["val_loss"] == rec["val_loss"]  # the same draws every time
    assert all(torch.equal(v, model_state[k]) for k, v in model.state_dict().items())

    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.1)  # other weights, another value
    assert hook(model, step=9)["val_loss"] != rec["val_loss"]


class KeyedData(torch.utils.data.Dataset):
    """A dataset that draws per item, as prepared latents do: from the key it is given, else the global RNG."""

    keyed_draws = True

    def __init__(self):
        self.keys = []

    def __len__(self):
        return 50

    def __getitem__(self, item):
        index, key = item if isinstance(item, tuple) else (item, None)
        self.keys.append(key)
        gen = torch.Generator().manual_seed(key) if key is not None else None
        return torch.randn((3, 8, 8), generator=gen, dtype=torch.float64), index % 4


def test_a_dataset_that_draws_gets_fixed_keys_through_the_training_subset():
    from zoo.diffusion.setup import build_objective

    recipe = zoo.load_recipe(RECIPE, ["train.val_n=20"])
    torch.manual_seed(0)
    model = zoo.build_model(recipe).double()
    data = KeyedData()
    hook = ValLoss(recipe, recipe["train"], data, (3, 8, 8), build_objective(recipe), torch.device("cpu"))
    assert hook.source == "synthetic:train (20 images)"  # a subset of the 50
    first = hook(model, step=0)["val_loss"]
    torch.manual_seed(123)  # the global RNG elsewhere: the items must not come from it
    assert hook(model, step=1)["val_loss"] == first
    assert data.keys and None not in data.keys


def test_label_drop_is_never_applied():
    hook, model = _hook(8)
    hook.objective.label_drop = 1.0  # a drop uniform of 1 is never below the rate: every label is kept
    kept = hook(model, step=0)["val_loss"]
    hook.objective.label_drop = 0.1
    assert hook(model, step=0)["val_loss"] == kept


def test_stratified_times_cover_the_schedule():
    from zoo.diffusion.time_input import index_to_time, time_to_index

    class Discrete:
        continuous, num_steps, t_min = False, 1000, 0.0

    every = stratified_times(1000, Discrete, seed=0)
    assert torch.equal(time_to_index(every, 1000).sort().values, torch.arange(1000))  # each step once
    four = stratified_times(4, Discrete, seed=0)
    assert torch.equal(four.sort().values, index_to_time(torch.tensor([125, 375, 625, 875]), 1000))
    assert not torch.equal(four, four.sort().values) or not torch.equal(stratified_times(4, Discrete, 1), four)

    class Continuous:
        continuous, num_steps, t_min = True, 1000, 0.2

    got = stratified_times(4, Continuous, seed=0).sort().values
    assert torch.allclose(got, torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64), rtol=0, atol=1e-15)


def test_a_dataset_with_a_holdout_split_is_measured_on_it(monkeypatch):
    made = []

    def build(data, shape, num_classes, seed=0):
        made.append(data.get("split", "train"))
        return synthetic_dataset(shape, 5, num_classes, seed=seed)

    build.splits = ("train", "holdout")
    zoo.register("dataset", "test_split_data")(build)
    try:
        images, source = held_out({"dataset": "test_split_data"}, synthetic_dataset((3, 8, 8), 50, 4), (3, 8, 8), 4,
                                  seed=0, limit=20)
        # A run trained on the holdout split is measured on (a subset of) what it trains on, and says so:
        # it used to report the same images as "holdout".
        trained, own = held_out({"dataset": "test_split_data", "split": "holdout"},
                                synthetic_dataset((3, 8, 8), 50, 4), (3, 8, 8), 4, seed=0, limit=20)
    finally:
        zoo.registry.unregister("dataset", "test_split_data")
    assert made == ["holdout"] and source == "test_split_data:holdout" and len(images) == 5
    assert own == "test_split_data:holdout (20 images)" and len(trained) == 20


@pytest.mark.parametrize("setting", ["train.val_n=0", "train.val_every=-1"])
def test_bad_settings_are_refused_by_name(setting):
    with pytest.raises(UserError, match=setting.split("=")[0].split(".")[1]):
        zoo.load_recipe(RECIPE, [setting])


def test_loss_png_draws_the_val_loss_on_the_loss_axis(tmp_path):
    from zoo.training.monitor import Monitor

    monitor = Monitor(tmp_path, start=0, total=4, log=lambda *_: None, tty=False)
    for step in (1, 2, 3, 4):
        monitor.record({"step": step, "loss": 1.0 / step, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 16.0})
        if step % 2 == 0:
            monitor.record_eval({"step": step, "val_loss": 2.0 / step, "val_n": 8, "val_source": "x",
                                 "val_seconds": 0.1})
    monitor.close()
    steps, vals = monitor.plot.val_line.get_data()
    assert list(steps) == [2, 4] and list(vals) == [1.0, 0.5]
    assert list(monitor.plot.line.get_data()[0]) == [1, 2, 3, 4]  # the loss curve skips the validation records
    assert monitor.plot.fd_ax is None  # no FD axis without FD records


def test_the_validation_loss_is_read_from_the_device_once():
    """Each batch's loss was read into Python as it came (``float``), a wait for the GPU per batch of
    the 512 triples; now the sum stays on the device until the end."""
    import zoo.training.val_loss as module
    from test_cuda_paths import HostReads

    hook, model = _hook(3 * module.VAL_BATCH)
    with HostReads(module.__file__, "__call__") as reads:  # not _batch: it reads the dataset's labels, on the CPU
        hook(model, step=1)
    assert reads.names == ["__float__"]
