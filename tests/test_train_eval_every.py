"""``train.eval_every``: a small FD of the EMA weights logged like the loss, without changing the losses,
with the run's reference statistics computed once (a resume reads them back), under DDP too."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.cli import main
from zoo.training import train

from pool_extractors import Pool4

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 synthetic pixels, 4 classes, ddim 5
SETTINGS = ["train.log_every=1", "train.sample_every=0", "train.ckpt_every=0"]
EVAL = ["train.eval_every=2", "train.eval_n=16", "train.eval_extractor=test_pool4"]


class Pool2(Pool4):
    name = "test_pool2"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1), None


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread, register_extractor):
    register_extractor("test_pool4", Pool4)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_fd_is_logged_every_n_steps_and_the_losses_do_not_change(tmp_path):
    lines = []
    recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL)
    train(recipe, tmp_path / "eval", steps=4, log=lines.append)
    train(zoo.load_recipe(RECIPE, SETTINGS), tmp_path / "plain", steps=4, log=lambda *_: None)

    records = _records(tmp_path / "eval")
    fds = [r for r in records if "fd" in r]
    assert [r["step"] for r in fds] == [2, 4] and all(math.isfinite(r["fd"]) and r["fd"] > 0 for r in fds)
    assert all(r["fd_n"] == 16 and r["fd_extractor"] == "test_pool4" for r in fds)
    # Same losses bit for bit: evaluating draws nothing from the training stream's RNG.
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in _records(tmp_path / "plain")]
    assert sum(" fd " in line for line in lines) == 2 and any(line.startswith("step       4  fd ") for line in lines)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval" / "tb"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("eval/fd")] == \
        [(r["step"], r["fd"]) for r in fds]  # TensorBoard stores float32: 1e-6 relative covers its rounding
    assert (tmp_path / "eval" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The reference: the statistics of the 64 training images through the extractor, in float64.
    from zoo.eval.reference import to_uint8
    from zoo.eval.stats import feature_statistics, frechet_distance
    from zoo.training.data import synthetic_dataset

    images = synthetic_dataset((3, 8, 8), 64, 4, seed=0).tensors[0]
    mu, sigma = feature_statistics(Pool4()(to_uint8(images))[0].double().numpy())
    with np.load(tmp_path / "eval" / "eval" / "fd_reference.npz") as ref:
        assert str(ref["extractor"]) == "test_pool4"
        assert ref["resolution"].tolist() == [8, 8]  # as zoo eval's statistics files: a later --ref warns at 16x16
        np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-12, atol=1e-15)

    # The FD at step 4 is that of the EMA weights saved at step 4 (not of the raw weights), same seeds.
    from zoo.eval import quick_fd
    from zoo.sample import load_model

    ema_model, _, _ = load_model(tmp_path / "eval" / "last")
    fd = quick_fd(ema_model, recipe, n=16, ref=str(tmp_path / "eval" / "eval" / "fd_reference.npz"),
                  extractor=Pool4(), seed=0)
    assert fd == pytest.approx(fds[-1]["fd"], rel=1e-9)
    raw_model, _ = zoo.checkpoint.load_checkpoint(tmp_path / "eval" / "last", weights="model")
    raw = quick_fd(raw_model.eval(), recipe, n=16, ref=str(tmp_path / "eval" / "eval" / "fd_reference.npz"),
                   extractor=Pool4(), seed=0)
    assert abs(raw - fd) > 1e-6 * fd
    assert frechet_distance(mu, sigma, mu, sigma) == 0.0


def test_a_resumed_run_reads_the_reference_back(tmp_path, monkeypatch):
    out, lines = tmp_path / "run", []
    train(zoo.load_recipe(RECIPE, SETTINGS + EVAL), out, steps=2, log=lambda *_: None)
    ref = out / "eval" / "fd_reference.npz"
    before = (ref.stat().st_mtime_ns, ref.read_bytes())

    from zoo.eval import reference

    def refuse(*args, **kwargs):
        raise AssertionError("the reference statistics were computed again")

    monkeypatch.setattr(reference, "extract", refuse)  # what the reference (not the samples) goes through
    train(zoo.load_recipe(RECIPE, SETTINGS + EVAL), out, steps=4, resume=out, log=lines.append)
    assert (ref.stat().st_mtime_ns, ref.read_bytes()) == before
    assert not any("reference statistics" in line for line in lines)
    assert [r["step"] for r in _records(out) if "fd" in r] == [2, 4]

    monkeypatch.undo()  # another extractor is another reference: computed again, replacing the file
    zoo.register("extractor", "test_pool2")(Pool2)
    try:
        train(zoo.load_recipe(RECIPE, SETTINGS + EVAL + ["train.eval_extractor=test_pool2"]), out, steps=6,
              resume=out, log=lines.append)
    finally:
        zoo.registry.unregister("extractor", "test_pool2")
    with np.load(ref) as f:
        assert str(f["extractor"]) == "test_pool2" and f["mu"].shape == (12,)
    assert [(r["step"], r["fd_extractor"]) for r in _records(out) if "fd" in r][-1] == (6, "test_pool2")
    # said, since the FDs on either side of it are not comparable (a jump of the curve was unexplained)
    assert any("earlier FD reference statistics were made otherwise" in line and "not comparable" in line
               for line in lines)


def test_a_resume_whose_fds_draw_from_another_seed_says_so(tmp_path):
    """The FDs of a run are drawn from sample.seed (fd_seed in each record). A resume that draws them from
    another seed says so: a step in the curve there is partly the draw's. A record without fd_seed is an
    earlier zoo's, which drew from train.seed."""
    out, lines = tmp_path / "run", []
    seeded = SETTINGS + EVAL + ["train.seed=7"]
    train(zoo.load_recipe(RECIPE, seeded + ["sample.seed=3"]), out, steps=2, log=lambda *_: None)
    assert [r["fd_seed"] for r in _records(out) if "fd" in r] == [3]
    train(zoo.load_recipe(RECIPE, seeded + ["sample.seed=3"]), out, steps=4, resume=out, log=lines.append)
    assert not any("draw their samples from seed" in line for line in lines)  # the same seed: nothing to say

    lines.clear()
    train(zoo.load_recipe(RECIPE, seeded + ["sample.seed=5"]), out, steps=6, resume=out, log=lines.append)
    notes = [line for line in lines if "draw their samples from seed" in line]
    assert len(notes) == 1 and "from seed 5" in notes[0] and "up to step 4 from seed 3" in notes[0], lines
    assert "sample.seed changed" in notes[0]

    # a log of an earlier zoo: no fd_seed, so drawn from the checkpoint's train.seed, 7, while sample.seed is 5
    records = _records(out)
    (out / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "fd_seed"}) + "\n"
                                           for r in records))
    lines.clear()
    train(zoo.load_recipe(RECIPE, seeded + ["sample.seed=5"]), out, steps=8, resume=out, log=lines.append)
    notes = [line for line in lines if "draw their samples from seed" in line]
    assert len(notes) == 1 and "up to step 6 from seed 7" in notes[0] and "from train.seed" in notes[0], lines
    lines.clear()  # the records since carry their seed: the same seed, nothing to say
    train(zoo.load_recipe(RECIPE, SETTINGS + EVAL + ["train.seed=5", "sample.seed=5"]), out, steps=10, resume=out,
          log=lines.append, allow_recipe_change=True)
    assert not any("draw their samples from seed" in line for line in lines)


def test_missing_extractor_weights_is_one_line_before_any_step(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(RECIPE), "--out", str(out), "--steps", "4", "--set", "train.eval_every=2",
            "--set", "train.eval_extractor=inception"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "ZOO_INCEPTION_WEIGHTS" in err
    # zoo train has no --extractor flags: the message names only what it reads (the variable, the recipe key)
    assert "set ZOO_INCEPTION_WEIGHTS=PATH in the environment" in err
    assert "efficientnet_lite0 (--set train.eval_extractor=efficientnet_lite0) works offline" in err
    assert "--extractor-weights" not in err and "--extractor " not in err
    assert not (out / "log.jsonl").exists()


def test_latent_data_without_a_reference_is_refused_at_startup(tmp_path):
    recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL)
    from zoo.training.eval_hook import fd_hook
    from zoo.training.distributed import Context

    recipe["data"] = {**recipe["data"], "latent": True}
    with pytest.raises(zoo.UserError, match="train.eval_ref"):
        fd_hook(recipe, recipe["train"], None, (4, 4, 4), tmp_path, Context(), print)


@pytest.mark.slow
def test_two_processes_evaluate_on_rank_0_only(tmp_path):
    """torchrun, 2 gloo processes, the real offline extractor and a validation loss: one writer, no deadlock,
    the 1-process losses."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "zoo", "train", str(RECIPE), "--out", str(tmp_path / "ddp"), "--steps", "4", "--device", "cpu"]
    for s in SETTINGS + ["train.eval_every=2", "train.eval_n=16", "train.val_every=2", "train.val_n=16"]:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,  # TMPDIR: torchrun's leftover folder
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reference statistics") == 1
    records = _records(tmp_path / "ddp")
    assert [r["step"] for r in records if "fd" in r] == [2, 4]
    assert all(math.isfinite(r["fd"]) and r["fd_extractor"] == "efficientnet_lite0" for r in records if "fd" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]  # the validation loss too, once per step
    single = train(zoo.load_recipe(RECIPE, SETTINGS), tmp_path / "one", steps=4, device="cpu", log=lambda *_: None)
    # Same global batch and per-sample draws; only the float32 summation order differs (2 x 8 vs 16 samples).
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in single], rel=1e-5)


def test_a_damaged_or_foreign_reference_file_is_computed_again(tmp_path):
    from zoo.training.data import synthetic_dataset
    from zoo.training.eval_hook import FDHook

    recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL)
    hook = FDHook(recipe, recipe["train"], synthetic_dataset((3, 8, 8), 64, 4), (3, 8, 8), tmp_path,
                  torch.device("cpu"), print)
    def stats(path):
        with np.load(path) as f:
            return f["mu"], f["sigma"]

    mu, sigma = stats(hook.prepare())
    data = hook.ref_path.read_bytes()
    hook.ref_path.write_bytes(data[: len(data) // 2])  # a truncated file
    again = stats(hook.prepare())
    np.testing.assert_array_equal(again[0], mu)
    np.testing.assert_array_equal(again[1], sigma)
    other = FDHook({**recipe, "data": {**recipe["data"], "size": 32}}, recipe["train"],
                   synthetic_dataset((3, 8, 8), 32, 4), (3, 8, 8), tmp_path, torch.device("cpu"), print)
    assert not np.array_equal(stats(other.prepare())[0], mu)  # other training data: other statistics


def test_statistics_of_an_earlier_image_reading_are_computed_again_with_a_note(tmp_path, monkeypatch):
    """A run's reference statistics record how zoo read the images (the eval cache version): statistics of an
    earlier reading (before transparency, 16-bit and float images were read as today) were reused on resume,
    and the FDs after it compared with pixels the samples no longer match."""
    from zoo.eval import reference
    from zoo.training.data import synthetic_dataset
    from zoo.training.eval_hook import FDHook

    recipe, lines = zoo.load_recipe(RECIPE, SETTINGS + EVAL), []
    hook = FDHook(recipe, recipe["train"], synthetic_dataset((3, 8, 8), 64, 4), (3, 8, 8), tmp_path,
                  torch.device("cpu"), lines.append)
    monkeypatch.setattr(reference, "CACHE_VERSION", reference.CACHE_VERSION - 1)  # a zoo of the earlier reading
    path = hook.prepare()
    before = path.stat().st_mtime_ns, path.read_bytes()
    monkeypatch.undo()
    lines.clear()
    hook.prepare()
    assert (path.stat().st_mtime_ns, path.read_bytes()) != before  # computed again
    assert any("earlier FD reference statistics were made otherwise" in line for line in lines), lines
    lines.clear()
    hook.prepare()  # read back from here on
    assert lines == []


def test_the_reference_key_holds_the_seed_only_where_it_picked_the_images(tmp_path):
    """fd_ref_key tells FDs of other reference images apart. train.seed picks synthetic images and a subset
    of a large dataset, but no image of a small folder (or emoji32's fixed holdout): a seed sweep there was
    marked 'not comparable' against identical statistics."""
    from PIL import Image

    from zoo.training.data import build_dataset
    from zoo.training.eval_hook import FDHook

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 100 if c == "a" else 200, 7)).save(tmp_path / "imgs" / c / f"{i}.png")

    def key(*settings):
        recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL + list(settings))
        shape = (3, recipe["model"]["input_size"], recipe["model"]["input_size"])
        dataset = build_dataset(recipe["data"], shape, 4, int(recipe["train"].get("seed") or 0))
        return FDHook(recipe, recipe["train"], dataset, shape, tmp_path / "run", torch.device("cpu"),
                      lambda *_: None).reference_key

    folder = ["data.dataset=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=2"]
    assert key(*folder, "train.seed=0") == key(*folder, "train.seed=1")  # the whole folder, whatever the seed
    assert key(*folder) != key(*folder, "data.image_size=4", "model.input_size=4")  # other pixels
    assert key("train.seed=0") != key("train.seed=1")  # synthetic images are drawn from the seed


def _hook(tmp_path, settings=(), log=lambda *_: None):
    from zoo.training.data import build_dataset
    from zoo.training.eval_hook import FDHook

    recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL + list(settings))
    shape = (3, recipe["model"]["input_size"], recipe["model"]["input_size"])
    dataset = build_dataset(recipe["data"], shape, 4, int(recipe["train"].get("seed") or 0))
    return FDHook(recipe, recipe["train"], dataset, shape, tmp_path / "run", torch.device("cpu"), log)


def test_a_plugin_datasets_reference_leaves_out_the_vae_it_decodes_with():
    """Which decoder (data.vae, data.vae_file) turns samples into images changes no reference image, so
    a plugin dataset's reference, made of its other data keys, leaves data.vae_file out too."""
    from zoo.eval.reference import reference_data

    zoo.register("dataset", "test_vae_file_data")(lambda data, shape, num_classes, seed=0: None)
    try:
        plain = reference_data({"dataset": "test_vae_file_data", "size": 8}, {})
        chosen = reference_data({"dataset": "test_vae_file_data", "size": 8, "vae": "/v",
                                 "vae_file": "autoencoder_kl.pth"}, {})
    finally:
        zoo.registry.unregister("dataset", "test_vae_file_data")
    assert chosen == plain == {"dataset": "test_vae_file_data", "size": 8}


def test_the_reference_key_ignores_data_settings_that_leave_the_images_as_they_are(tmp_path):
    """A default written out (data.split: train), a latent setting beside image data
    (latent: false, vae_scale) or the flips gave another fd_ref_key for the same images, and zoo compare
    called two runs' FDs against identical statistics 'measured differently'."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 100 if c == "a" else 200, 7)).save(tmp_path / "imgs" / c / f"{i}.png")
    folder = ["data.dataset=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=2"]
    plain = _hook(tmp_path, folder).reference_key
    for same in (["data.split=train"], ["data.latent=false", "data.vae_scale=0.5"], ["data.random_flip=false"]):
        assert _hook(tmp_path, folder + same).reference_key == plain, same
    (tmp_path / "imgs" / "b" / "3.png").write_bytes((tmp_path / "imgs" / "b" / "0.png").read_bytes())
    assert _hook(tmp_path, [*folder[:1], f"data.root={tmp_path}", *folder[2:]]).reference_key != plain  # another root

    synthetic = _hook(tmp_path).reference_key
    assert _hook(tmp_path, ["data.split=train", "data.random_flip=false"]).reference_key == synthetic
    assert _hook(tmp_path, ["data.size=32"]).reference_key != synthetic  # fewer images


def _folder(root: Path, shade: int = 0) -> list[str]:
    """Two class folders of three 8x8 images under ``root`` (``shade`` changes every pixel, not the count)."""
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i + shade, 100 if c == "a" else 200, 7)).save(root / c / f"{i}.png")
    return ["data.dataset=image_folder", f"data.root={root}", "data.num_classes=2"]


def test_the_reference_key_names_a_folder_one_way_and_tells_others_apart(tmp_path, monkeypatch):
    """fd_ref_key kept data.root and train.eval_ref as typed: imgs, ./imgs/ and the absolute path were three
    keys for one folder (a resume said its FDs were not comparable, zoo compare 'measured differently'), and
    a second folder, or synthetic images of another class count, were told apart by nothing but their count."""
    folder = _folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    spellings = (tmp_path / "imgs", f"{tmp_path / 'imgs'}/", "imgs", "./imgs/", tmp_path / "imgs" / ".." / "imgs")
    keys = {_hook(tmp_path, [folder[0], f"data.root={root}", folder[2]]).reference_key for root in spellings}
    assert len(keys) == 1, keys
    other = _folder(tmp_path / "other", shade=20)  # as many images, other pixels
    assert _hook(tmp_path, other).reference_key not in keys
    refs = {_hook(tmp_path, [f"train.eval_ref={spec}"]).reference_key for spec in ("imgs", tmp_path / "imgs")}
    assert len(refs) == 1 and refs != {_hook(tmp_path, ["train.eval_ref=other"]).reference_key}
    assert _hook(tmp_path, ["data.num_classes=2"]).reference_key != _hook(tmp_path).reference_key  # synthetic


@pytest.mark.parametrize("ref, said", [
    ("nosuch", "train.eval_ref 'nosuch' is neither an .npz file, an image folder nor a registered dataset"),
    ("emoji32:nosplit", "dataset emoji32 has no split 'nosplit'"),
    ("/no/such/ref.npz", "reference file /no/such/ref.npz does not exist"),
])
def test_a_bad_eval_ref_is_named_as_the_recipe_key(tmp_path, ref, said):
    """The reference's refusals spoke of zoo eval's --ref ("--ref 'nosuch' is neither ...", "(--ref
    emoji32:train)") to a user who had set train.eval_ref in a recipe."""
    from zoo.errors import UserError

    with pytest.raises(UserError) as err:
        _hook(tmp_path, [f"train.eval_ref={ref}"]).prepare()
    assert err.value.message.startswith(said), err.value.message
    assert "--ref" not in str(err.value)
    if ref == "emoji32:nosplit":
        assert err.value.suggestion == "--set train.eval_ref=emoji32:train"


def test_an_eval_ref_of_other_statistics_names_the_recipe_keys(tmp_path):
    """A train.eval_ref .npz of another extractor's statistics was refused with zoo eval's flags
    ("evaluate with --extractor inception", "--extractor-weights ..."), which zoo train has not."""
    from zoo.errors import UserError

    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, extractor=np.str_("inception"))
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma)
    said = {}
    for name in ("stats", "adm"):
        with pytest.raises(UserError) as err:
            _hook(tmp_path, [f"train.eval_ref={tmp_path / name}.npz"]).prepare()
        said[name] = str(err.value)
        assert "--extractor" not in said[name], said[name]
    assert said["stats"].endswith("holds inception statistics; evaluate with --set train.eval_extractor=inception")
    assert "which only --set train.eval_extractor=inception uses (--set train.eval_extractor=inception with " \
           "ZOO_INCEPTION_WEIGHTS=/path/to/pt_inception-2015-12-05-6726825d.pth in the environment, or" in said["adm"]


def test_a_run_keyed_by_its_typed_paths_resumes_without_a_note(tmp_path, monkeypatch):
    """Runs started before the key resolved paths recorded the key of ./imgs/ as typed: their resume with the
    same spelling must not say its FDs are not comparable (a key of other images still does)."""
    folder = _folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    typed = [folder[0], "data.root=./imgs/", folder[2]]
    hook = _hook(tmp_path, typed)
    assert hook._key(as_typed=True) != hook.reference_key
    for key, noted in ((hook._key(as_typed=True), False), ("0123456789ab", True)):
        (tmp_path / "run" / "eval").mkdir(parents=True, exist_ok=True)
        np.savez(hook.ref_path, mu=np.zeros(3), sigma=np.eye(3), identity=np.str_("{}"), key=np.str_(key))
        lines = []
        _hook(tmp_path, typed, lines.append).prepare()
        assert any("made otherwise" in line for line in lines) is noted, (key, lines)


@pytest.mark.parametrize("where", ["data.root", "train.eval_ref", "train.eval_ref=image_folder"])
def test_reference_images_replaced_in_place_are_measured_again_with_a_note(tmp_path, where):
    """The run's statistics were keyed by the folder's path and image count alone: a resume after its images
    were replaced (same names, same count) scored its FDs against the old images' statistics, silently. So
    did a reference named by its dataset, image_folder, which reads the recipe's data.root."""
    folder = _folder(tmp_path / "imgs")
    settings = {"data.root": folder, "train.eval_ref": [f"train.eval_ref={tmp_path / 'imgs'}"],
                "train.eval_ref=image_folder": [*folder, "train.eval_ref=image_folder"]}[where]
    path = _hook(tmp_path, settings).prepare()
    before = np.load(path)["mu"]
    lines = []
    _hook(tmp_path, settings, lines.append).prepare()
    assert lines == []  # nothing changed: read back
    _folder(tmp_path / "imgs", shade=30)
    for png in (tmp_path / "imgs").rglob("*.png"):
        os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    _hook(tmp_path, settings, lines.append).prepare()
    assert not np.allclose(np.load(path)["mu"], before)
    assert any("changed on disk" in line for line in lines) and not any("made otherwise" in line for line in lines)


def test_a_run_whose_dataset_reference_was_not_stamped_resumes_without_a_note(tmp_path):
    """Runs started before a dataset-name reference (train.eval_ref=image_folder) stamped its files recorded
    an empty stamp: their resume recomputes the statistics once, without saying the images changed on disk."""
    settings = [*_folder(tmp_path / "imgs"), "train.eval_ref=image_folder"]
    path = _hook(tmp_path, settings).prepare()
    with np.load(path) as f:
        saved = {k: f[k] for k in f.files}
    identity = json.loads(str(saved["identity"]))
    assert identity["files"]  # stamped now
    np.savez(path, **{**saved, "identity": np.str_(json.dumps({**identity, "files": ""}, sort_keys=True))})
    lines = []
    _hook(tmp_path, settings, lines.append).prepare()
    assert any("FD reference statistics of" in line for line in lines)  # computed again, with the stamp
    assert not any("note" in line for line in lines), lines


def test_a_resume_that_recomputes_the_same_reference_says_nothing_about_comparability(tmp_path):
    """Flips turned off at a resume recompute the statistics (the cache's identity holds every data setting)
    of the same images: the resume said the FDs from there on were not comparable, while zoo compare, reading
    their fd_ref_key, rightly compared them."""
    lines = []
    path = _hook(tmp_path).prepare()
    before = path.read_bytes()
    _hook(tmp_path, ["data.random_flip=false"], lines.append).prepare()
    assert path.read_bytes() != before and any("FD reference statistics of" in line for line in lines)
    assert not any("made otherwise" in line for line in lines), lines
    lines.clear()
    _hook(tmp_path, ["data.size=32"], lines.append).prepare()  # other images: said
    assert any("made otherwise" in line and "not comparable" in line for line in lines), lines


def test_loss_png_draws_the_fd_on_a_second_axis(tmp_path):
    from zoo.training.monitor import Monitor

    monitor = Monitor(tmp_path, start=0, total=4, log=lambda *_: None, tty=False)
    for step in (1, 2, 3, 4):
        monitor.record({"step": step, "loss": 1.0 / step, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 16.0})
        if step % 2 == 0:
            monitor.record_eval({"step": step, "fd": 100.0 / step, "fd_n": 16, "fd_extractor": "x", "fd_seconds": 0.1})
    monitor.close()
    steps, fds = monitor.plot.fd_line.get_data()
    assert list(steps) == [2, 4] and list(fds) == [50.0, 25.0]
    assert list(monitor.plot.line.get_data()[0]) == [1, 2, 3, 4]  # the loss curve skips the FD records


def test_the_logged_fd_is_the_one_zoo_eval_gives_for_that_checkpoint(tmp_path, capsys):
    """The evaluations drew from train.seed while zoo eval draws from sample.seed: a logged FD could not be
    reproduced. Now `zoo eval RUN/step_N --n eval_n --ref RUN/eval/fd_reference.npz` gives it."""
    out = tmp_path / "run"
    recipe = zoo.load_recipe(RECIPE, SETTINGS + EVAL + ["train.seed=5", "sample.seed=3", "train.ckpt_every=4"])
    train(recipe, out, steps=4, log=lambda *_: None)
    logged = [r for r in _records(out) if "fd" in r][-1]
    assert logged["step"] == 4
    assert main(["eval", str(out / "step_0000004"), "--n", "16", "--ref", str(out / "eval" / "fd_reference.npz"),
                 "--extractor", "test_pool4"]) == 0
    result = json.loads(next((out / "eval").glob("step_0000004-test_pool4-n16-*.json")).read_text())
    assert result["protocol"]["seed"] == 3
    # the same images (per-sample seeds), scored in batches of another size: float32 feature sums in another order
    assert result["metrics"]["fd"] == pytest.approx(logged["fd"], rel=1e-4)


def test_a_resume_does_the_grid_fd_and_validation_loss_its_step_lost_to_a_kill(tmp_path):
    """They follow the save of their step: a run killed (OOM, SLURM's SIGKILL) or stopped while drawing them
    resumed after that step, so its FD, validation loss and grid were lost for good, without a word. The
    resume does them first, with the same weights and draws: the values the uninterrupted run logged."""
    from PIL import Image

    settings = SETTINGS + EVAL + ["train.ckpt_every=2", "train.sample_every=2", "train.sample_n=4",
                                  "train.val_every=2", "train.val_n=8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(zoo.load_recipe(RECIPE, settings), whole, steps=4, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), cut, steps=2, log=lambda *_: None)
    log = cut / "log.jsonl"  # as the kill leaves it: step 2's loss and checkpoint, none of what follows them
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if not any(key in json.loads(line) for key in ("fd", "val_loss"))))
    (cut / "samples" / "step_0000002.png").unlink()
    lines = []
    train(zoo.load_recipe(RECIPE, settings), cut, steps=4, resume=cut, log=lines.append)
    assert any("note: step 2's sample grid, FD, validation loss were not done before the run stopped" in line
               for line in lines), lines

    def evaluated(out):
        return [(r["step"], r.get("fd"), r.get("val_loss")) for r in _records(out) if "fd" in r or "val_loss" in r]

    assert evaluated(cut) == evaluated(whole) and [step for step, *_ in evaluated(cut)] == [2, 2, 4, 4]
    grid = np.asarray(Image.open(cut / "samples" / "step_0000002.png"))
    np.testing.assert_array_equal(grid, np.asarray(Image.open(whole / "samples" / "step_0000002.png")))
    lines.clear()  # nothing missing: nothing done again
    train(zoo.load_recipe(RECIPE, settings), cut, steps=6, resume=cut, log=lines.append)
    assert not any("were not done" in line or "was not done" in line for line in lines)
    assert [step for step, *_ in evaluated(cut)] == [2, 2, 4, 4, 6, 6]


def test_a_stop_while_the_fd_extracts_features_cuts_it_short_and_saves_that_step(tmp_path, monkeypatch, capsys):
    """The extractor's pass over the samples calls no diffusion model, whose forward alone checked for a stop:
    a SIGTERM then went unheard to the pass's end, and under torchrun (30 s of grace) rank 0 was killed
    mid-pass with last/ never saved. Cut short, the run saves step 2 and exits 143; the resume does the FD."""
    import signal

    import zoo.eval.runner as runner

    real, sent = runner.extract, []

    def extract(extractor, *args, **kwargs):  # the samples are drawn: SIGTERM as the extractor starts on them
        if not sent:
            sent.append(extractor)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(extractor, *args, **kwargs)

    monkeypatch.setattr(runner, "extract", extract)
    argv = ["train", str(RECIPE), "--out", str(tmp_path), "--steps", "4"] + [x for k in SETTINGS + EVAL
                                                                            for x in ("--set", k)]
    assert main(argv) == 143
    out = capsys.readouterr().out
    assert sent and "zoo train: the FD evaluation of step 2 was cut short by SIGTERM; the run stops now" in out
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert not any("fd" in r for r in _records(tmp_path))
    assert not sent[0]._forward_pre_hooks  # the run's stop check came off the extractor with the run
    assert main(argv + ["--resume", str(tmp_path)]) == 0
    assert [r["step"] for r in _records(tmp_path) if "fd" in r] == [2, 4]


def test_the_resumed_steps_work_is_done_only_where_the_run_before_had_it_due(tmp_path):
    """A run that finished without grids, resumed with sample_every dividing its step, was told 'step 4's sample
    grid was not done before the run stopped' and drew it: that run never planned it."""
    out, lines = tmp_path / "run", []
    train(zoo.load_recipe(RECIPE, SETTINGS + ["train.ckpt_every=4"]), out, steps=4, log=lambda *_: None)
    again = SETTINGS + EVAL + ["train.ckpt_every=4", "train.sample_every=4", "train.sample_n=4", "train.val_every=4",
                               "train.val_n=8", "train.eval_every=4"]
    train(zoo.load_recipe(RECIPE, again), out, steps=6, resume=out, log=lines.append)
    assert not any("not done before the run stopped" in line for line in lines), lines
    assert not (out / "samples" / "step_0000004.png").exists()
    assert not [r for r in _records(out) if r["step"] == 4 and ("fd" in r or "val_loss" in r)]


def test_a_lost_grid_is_not_drawn_by_a_resume_whose_sample_every_no_longer_has_it_due(tmp_path):
    """The catch-up draws the resumed step's grid only where the resume's own train.sample_every still has
    that step due (or it is the run's last): resumed with sample_every 3 at step 2, a grid lost to a kill at
    step 2 under sample_every 2 stays undrawn and no 'not done' note is said."""
    settings = SETTINGS + ["train.ckpt_every=2", "train.sample_every=2", "train.sample_n=4"]
    out, lines = tmp_path / "run", []
    train(zoo.load_recipe(RECIPE, settings), out, steps=2, log=lambda *_: None)  # train.steps 30: 2 is not the last
    (out / "samples" / "step_0000002.png").unlink()  # as a kill after step 2's save leaves it
    now = SETTINGS + ["train.ckpt_every=2", "train.sample_every=3", "train.sample_n=4"]
    train(zoo.load_recipe(RECIPE, now), out, steps=3, resume=out, log=lines.append)
    assert not any("not done before the run stopped" in line for line in lines), lines
    assert not (out / "samples" / "step_0000002.png").exists()


def test_a_resume_into_another_out_does_not_catch_up_the_step_it_starts_from(tmp_path):
    """The catch-up is for a run resumed where it was saved: resumed into another --out, whose log and samples/
    start empty, the step it starts from was 'not done' there and its grid drawn again into the new run."""
    settings = SETTINGS + ["train.ckpt_every=2", "train.sample_every=2", "train.sample_n=4"]
    lines = []
    train(zoo.load_recipe(RECIPE, settings), tmp_path / "a", steps=2, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), tmp_path / "b", steps=3, resume=tmp_path / "a" / "last",
          log=lines.append)
    assert not any("not done before the run stopped" in line for line in lines), lines
    assert not (tmp_path / "b" / "samples" / "step_0000002.png").exists()
    assert [r["step"] for r in _records(tmp_path / "b")] == [3]


def test_a_run_that_logs_no_losses_still_gets_its_lost_validation_loss_back(tmp_path):
    """train.log_every 0 still writes FD and validation-loss records to log.jsonl; a resume skipped them as if
    nothing were logged, so one lost to a kill stayed lost."""
    settings = ["train.sample_every=0", "train.log_every=0", "train.ckpt_every=2", "train.val_every=2",
                "train.val_n=8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(zoo.load_recipe(RECIPE, settings), whole, steps=2, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), cut, steps=2, log=lambda *_: None)
    (cut / "log.jsonl").write_text("")  # the kill came before the step-2 validation loss
    train(zoo.load_recipe(RECIPE, settings), cut, steps=3, resume=cut, log=lambda *_: None)
    assert [(r["step"], r["val_loss"]) for r in _records(cut)] == [(r["step"], r["val_loss"]) for r in _records(whole)]


def test_a_resume_with_nothing_left_draws_the_lost_final_grid_and_brings_last_up_to_date(tmp_path):
    """A kill between the final step's step_* save and its last/ save (or before the final grid, drawn at the
    last step when it is no multiple of sample_every): the resume, with nothing left to train, said 'done'
    with last/ still holding an older step (what zoo sample RUN reads) and the final grid missing."""
    import shutil

    from PIL import Image

    settings = SETTINGS + ["train.ckpt_every=2", "train.sample_every=2", "train.sample_n=4", "train.steps=5"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(zoo.load_recipe(RECIPE, settings), whole, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), cut, log=lambda *_: None)
    (cut / "samples" / "step_0000005.png").unlink()  # the final grid, no multiple of 2
    shutil.rmtree(cut / "last")
    shutil.copytree(cut / "step_0000004", cut / "last")  # last/ as step 4 left it: its seal older than step_5's
    lines = []
    train(zoo.load_recipe(RECIPE, settings), cut, resume=cut, log=lines.append)
    assert any("note: step 5's sample grid was not done" in line for line in lines), lines
    pixels = [np.asarray(Image.open(out / "samples" / "step_0000005.png")) for out in (cut, whole)]
    np.testing.assert_array_equal(*pixels)
    assert torch.load(cut / "last" / "trainer_state.pt", weights_only=True)["step"] == 5
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (zoo.weights.load_weights(out / "last" / name) for out in (cut, whole))
        assert all(torch.equal(a[k], b[k]) for k in a)
