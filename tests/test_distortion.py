"""``zoo eval --distortion``: the share of samples a classifier rejects as their own class, per class, grid, JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.checkpoint import save_checkpoint
from zoo.classifier import ConvNeXtClassifier, save_classifier
from zoo.cli import main
from zoo.errors import UserError
from zoo.eval.distortion import RULE, Scorer, analyse, build_scorer, distortion_share, own_class_probabilities
from zoo.eval.extractors import Extractor
from zoo.eval.reference import save_npz

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 pixels, 4 classes, ddim 5 steps

pytestmark = pytest.mark.usefixtures("one_thread")


class PixelScorer(Scorer):
    """A fake classifier with known probabilities: a sample's own-class probability is its first pixel / 255
    (the rest spread evenly over the other classes)."""

    num_classes = 4

    def forward(self, images):
        p = images[:, 0, 0, 0].double() / 255.0
        out = ((1 - p) / 3)[:, None].repeat(1, 4)
        out[torch.arange(len(p)), images[:, 1, 0, 0].long()] = p  # green pixel: the class it scores for
        return out

    def describe(self):
        return {"kind": "test", "weights_sha256": "0" * 64}


class PoolFeatures(Extractor):
    name = "test_pool_distortion"

    def forward(self, images):
        f = F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
        return f, None


@pytest.fixture(autouse=True)
def _setup(isolated_eval, register_extractor):
    register_extractor(PoolFeatures.name, PoolFeatures)


def _images(own_prob_bytes, labels):
    """uint8 (N, 3, 4, 4): red pixel = own-class probability x 255, green pixel = the label (scored class)."""
    x = torch.full((len(labels), 3, 4, 4), 200, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(own_prob_bytes, dtype=torch.uint8)
    x[:, 1, 0, 0] = torch.tensor(labels, dtype=torch.uint8)
    return x


# own-class probabilities (x255) and labels of 10 samples; threshold 0.5 = 127.5/255
PROBS = [10, 250, 100, 130, 0, 255, 127, 128, 60, 200]
LABELS = [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
# rejected (< 127.5): samples 0, 2, 4, 6, 8 -> 5/10; class 0: 1/2, class 1: 1/2, class 2: 2/3, class 3: 1/3


def test_the_share_is_exact_overall_and_per_class():
    own = np.array(PROBS) / 255.0
    out = distortion_share(own, np.array(LABELS), 0.5, 5)
    assert out["share"] == 0.5 and out["rejected"] == 5 and out["n"] == 10 and out["rule"] == RULE
    assert {c: (v["n"], v["rejected"]) for c, v in out["per_class"].items()} == {
        "0": (2, 1), "1": (2, 1), "2": (3, 2), "3": (3, 1)}  # class 4 has no samples: not listed
    assert out["per_class"]["2"]["share"] == 2 / 3
    assert out["per_class"]["3"]["mean_own_probability"] == pytest.approx((128 + 60 + 200) / 765, rel=1e-15)
    # "below" is strict: a probability equal to the threshold is kept
    assert distortion_share(np.array([0.5, 0.25]), np.array([0, 0]), 0.5, 1)["rejected"] == 1


def test_scoring_reads_each_samples_own_class_and_keeps_the_lowest_rejected_for_the_grid():
    images, labels = _images(PROBS, LABELS), np.array(LABELS)
    batches = [(images[i:i + 3], labels[i:i + 3]) for i in range(0, 10, 3)]  # 4 batches, the last of 1
    own, got_labels, kept, idx = own_class_probabilities(PixelScorer(), batches, 0.5, grid_limit=3)
    assert np.array_equal(own, np.array(PROBS) / 255.0) and np.array_equal(got_labels, labels)
    assert idx.tolist() == [4, 0, 8]  # rejected, lowest probability first, at most 3
    assert torch.equal(kept, images[[4, 0, 8]])


def _samples_result(tmp_path: Path) -> dict:
    """A zoo eval result whose samples directory holds two shards of the 10 samples above."""
    images, labels = _images(PROBS, LABELS), np.array(LABELS)
    samples = tmp_path / "eval" / "samples-last-abc"
    for a, b in ((0, 6), (6, 10)):
        save_npz(samples / f"shard-{a:07d}-{b:07d}.npz", images=images[a:b].permute(0, 2, 3, 1).numpy(),
                 labels=labels[a:b], indices=np.arange(a, b))
    path = tmp_path / "eval" / "last-x-n10-abc.json"
    result = {"metrics": {"fd": 1.0}, "n": 10, "samples": str(samples), "protocol": {"seed": 0}}
    path.write_text(json.dumps(result))
    return {**result, "path": str(path)}


def test_analyse_writes_the_share_the_grid_and_the_probabilities_into_the_eval_json(tmp_path):
    result = analyse(_samples_result(tmp_path), PixelScorer(), threshold=0.5, batch_size=4, grid_limit=64,
                     log=lambda _: None)
    saved = json.loads(Path(result["path"]).read_text())
    d = saved["distortion"]
    assert saved["metrics"] == {"fd": 1.0} and saved["protocol"] == {"seed": 0}  # the rest is kept
    assert {"threshold", "rule", "n", "rejected", "share", "per_class", "classifier", "grid", "grid_indices",
            "probabilities", "mean_own_probability"} <= set(d)
    assert d["share"] == 0.5 and d["threshold"] == 0.5 and d["classifier"]["kind"] == "test"
    assert d["grid_indices"] == [4, 0, 8, 2, 6]
    with Image.open(d["grid"]) as grid:  # 5 tiles of 4x4, 3 per row (ceil(sqrt(5))), 2 px padding
        assert grid.size == (3 * 6 + 2, 2 * 6 + 2)
        tile = np.asarray(grid)[2:6, 2:6]
    assert tile[0, 0, 0] == 0 and tile[0, 0, 1] == 2  # the first tile is sample 4 (probability 0, class 2)
    with np.load(d["probabilities"]) as f:
        assert np.array_equal(f["own_class_probability"], np.array(PROBS) / 255.0)
    # nothing rejected: no grid
    class Sure(PixelScorer):
        def forward(self, images):
            return F.one_hot(images[:, 1, 0, 0].long(), 4).double()

    assert analyse(result, Sure(), threshold=0.5, log=lambda _: None)["distortion"]["grid"] is None
    assert not Path(d["grid"]).exists()  # the first classifier's rejections were left beside "none rejected"


# --------------------------------------------------------------------------- through the command line


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    recipe = zoo.load_recipe(RECIPE)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    return save_checkpoint(tmp_path / "ckpt", model, recipe, ema=model)


def _classifier(path: Path, classes: int = 4, size: int = 8) -> Path:
    torch.manual_seed(0)
    return save_classifier(path, ConvNeXtClassifier(classes, image_size=size, dims=(8,), depths=(1,)), {
        "holdout_accuracy": 0.75})


def test_zoo_eval_distortion_end_to_end(checkpoint, tmp_path, capsys):
    cls = _classifier(tmp_path / "cls")
    argv = f"eval {{ckpt}} --n 8 --ref synthetic --extractor {PoolFeatures.name} --batch-size 4 --distortion " \
           "--classifier {cls} --threshold 0.3 --json"
    # split before the paths go in: a path with a space stays one argument
    assert main([a.replace("{ckpt}", str(checkpoint)).replace("{cls}", str(cls)) for a in argv.split()]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(Path(printed["path"]).read_text())
    d = saved["distortion"]
    assert d == printed["distortion"] and d["n"] == 8 and d["threshold"] == 0.3
    assert d["classifier"]["kind"] == "zoo" and d["classifier"]["holdout_accuracy"] == 0.75
    assert d["classifier"]["path"] == str(cls.resolve()) and len(d["classifier"]["weights_sha256"]) == 64
    # the share agrees with scoring the samples by hand
    from zoo.eval.runner import sample_batches

    scorer = build_scorer(str(cls))
    own = np.concatenate([scorer(x)[np.arange(len(y)), y].numpy() for x, y in
                          sample_batches(Path(saved["samples"]), 8, 8)])
    assert d["rejected"] == int((own < 0.3).sum()) and sum(v["n"] for v in d["per_class"].values()) == 8
    assert (d["grid"] is None) == (d["rejected"] == 0) and saved["metrics"]["fd"] >= 0
    # the same evaluation again without --distortion keeps the count of the same samples (it dropped it)
    plain = [a for a in argv.split() if a not in ("--distortion", "--classifier", "{cls}", "--threshold", "0.3")]
    assert main([a.replace("{ckpt}", str(checkpoint)) for a in plain]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["path"] == printed["path"] and again["distortion"] == d
    assert json.loads(Path(printed["path"]).read_text())["distortion"] == d


def _bad(argv: str, tmp_path: Path, capsys) -> str:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv.split()]) == 2  # a path with a space: one argument
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "ckpt-eval").exists()  # failed before sampling
    return err


def test_a_missing_or_mismatched_classifier_is_one_line_before_sampling(checkpoint, tmp_path, capsys):
    base = "eval {tmp}/ckpt --n 4 --ref synthetic --extractor " + PoolFeatures.name
    assert "--distortion needs --classifier" in _bad(base + " --distortion", tmp_path, capsys)
    assert "classifier directory {tmp}/none does not exist".replace("{tmp}", str(tmp_path)) in _bad(
        base + " --distortion --classifier {tmp}/none", tmp_path, capsys)
    _classifier(tmp_path / "cls5", classes=5)
    assert "the classifier has 5 classes but checkpoint" in _bad(
        base + " --distortion --classifier {tmp}/cls5", tmp_path, capsys)
    _classifier(tmp_path / "cls16", size=16)
    assert "takes 16x16 images" in _bad(base + " --distortion --classifier {tmp}/cls16", tmp_path, capsys)
    assert "zoo: error: --classifier goes with --distortion (add --distortion" in _bad(
        base + " --classifier {tmp}/cls5", tmp_path, capsys)
    assert "zoo: error: --threshold goes with --distortion" in _bad(base + " --threshold 7", tmp_path, capsys)  # was ignored
    assert "--classifier, --classifier-weights and --threshold go with --distortion" in _bad(
        base + " --classifier x --classifier-weights y --threshold 0.3", tmp_path, capsys)
    assert "--threshold must be in (0, 1]" in _bad(
        base + " --distortion --classifier {tmp}/cls5 --threshold 0", tmp_path, capsys)
    assert "needs its weights as a local file" in _bad(
        base + " --distortion --classifier timm:test_resnet", tmp_path, capsys)
    assert "{tmp}/w.pth does not exist".replace("{tmp}", str(tmp_path)) in _bad(
        base + " --distortion --classifier timm:test_resnet --classifier-weights {tmp}/w.pth", tmp_path, capsys)


def test_a_timm_classifier_from_a_local_file_resizes_crops_and_normalises_as_timm_says(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False).eval()  # 160 px input, crop_pct 0.95, mean = std = 0.5
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    scorer = build_scorer("timm:test_resnet", str(weights))
    assert scorer.num_classes == 1000 and scorer.describe()["interpolation"] == "bilinear"
    # at floor(160 / 0.95) = 168 px no resize happens: the scorer is the centre 160 px crop, normalised
    images = torch.randint(0, 256, (2, 3, 168, 168), dtype=torch.uint8)
    x = (images[..., 4:164, 4:164].float() / 255.0 - 0.5) / 0.5  # float32 in the scorer's order: the same bits
    with torch.no_grad():
        expected = torch.softmax(net(x).double(), dim=-1)
        got = scorer(images)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-12, rtol=0)
    assert scorer(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)).shape == (1, 1000)  # other sizes resize
    # a classifier fine-tuned on 9 classes: timm builds 1000, and the weights were refused as not matching
    nine = timm.create_model("test_resnet", pretrained=False, num_classes=9).eval()
    save_file({k: v.contiguous() for k, v in nine.state_dict().items()}, str(tmp_path / "nine.safetensors"))
    scorer = build_scorer("timm:test_resnet", str(tmp_path / "nine.safetensors"))
    with torch.no_grad():
        expected = torch.softmax(nine(x).double(), dim=-1)
    assert scorer.num_classes == 9 and torch.allclose(scorer(images), expected, atol=1e-12, rtol=0)
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="does not match the model"):
        build_scorer("timm:test_resnet", str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="no_such_net"):
        build_scorer("timm:no_such_net", str(weights))


class NaNScorer(PixelScorer):
    """A classifier whose outputs are NaN for samples 3 and 4 (own-class bytes 130 and 0), as NaN weights make them."""

    def forward(self, images):
        out = super().forward(images)
        out[(images[:, 0, 0, 0] == 130) | (images[:, 0, 0, 0] == 0)] = float("nan")
        return out


def test_nan_probabilities_are_refused_not_counted_as_kept(tmp_path):
    """`NaN < threshold` is False: a classifier scoring NaN rejected no sample and reported distortion 0.0000."""
    images, labels = _images(PROBS, LABELS), np.array(LABELS)
    with pytest.raises(UserError, match=r"NaN or inf probabilities for sample 3 \(2 of the 3 scored together\)"):
        own_class_probabilities(NaNScorer(), [(images[i:i + 3], labels[i:i + 3]) for i in range(0, 10, 3)], 0.5)
    with pytest.raises(UserError, match="NaN or inf probabilities"):
        distortion_share(np.array([0.2, np.nan]), np.array([0, 1]), 0.5, 2)
    with pytest.raises(UserError, match="NaN or inf probabilities"):
        analyse(_samples_result(tmp_path), NaNScorer(), log=lambda _: None)


def test_a_classifier_with_nan_weights_is_refused_when_loaded(tmp_path):
    from zoo.classifier import load_classifier

    net = ConvNeXtClassifier(4, image_size=8, dims=(8,), depths=(1,))
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    out = save_classifier(tmp_path / "cls", net, {})
    with pytest.raises(UserError, match=r"model.safetensors: tensor \S+ holds NaN or inf values.*zoo train-classifier"):
        load_classifier(out)


@pytest.mark.parametrize("rank, expected", [("0", "cuda"), ("1", "cpu")])
def test_under_torchrun_only_rank_0_puts_the_classifier_on_the_gpu(monkeypatch, capsys, rank, expected):
    """Every rank built the classifier on 'cuda' before the process group set each rank's device, so all N
    copies (and N CUDA contexts) landed on GPU 0; only rank 0 scores, the others check it on the cpu."""
    import torch

    import zoo.eval.distortion_cli as distortion_cli
    import zoo.guards
    from zoo.cli import main
    from zoo.errors import UserError

    seen = []

    def record(args, device):
        seen.append(str(device))
        raise UserError("stop here")

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(zoo.guards, "resolve_device", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(distortion_cli, "scorer_for", record)
    assert main(["eval", "runs/x", "--n", "4", "--distortion", "--classifier", "c"]) == 2
    assert seen == [expected]
