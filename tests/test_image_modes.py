"""How image folders read what PIL opens: transparency on white, 16-bit and float images at their real
scale, files of other suffixes named, a class folder linking to the root refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.cli import main
from zoo.errors import UserError
from zoo.training.crop import to_rgb
from zoo.training.data import ImageFolder


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(to_rgb(im)).astype(int)


def test_transparent_pixels_are_white_as_emoji32_renders_them(tmp_path):
    """convert("RGB") drops alpha: the colour a file keeps under transparent pixels showed (black in most RGBA
    PNGs, the palette entry in palette PNGs, red here), and PIL warned about palette transparency."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)      # hidden red under alpha 0: white
    rgba[:, 1] = (0, 0, 255, 255)    # opaque blue: itself
    rgba[:, 2] = (0, 0, 0, 128)      # black at alpha 128: 255 * (1 - 128/255) = 127 (PIL rounds 126.99)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = _rgb(tmp_path / "rgba.png")
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 0, 255]
    assert abs(got[0, 2] - 127).max() <= 1

    la = np.zeros((2, 2, 2), np.uint8)
    la[:, 0] = (0, 0)                # black, transparent: white
    la[:, 1] = (40, 255)             # opaque grey 40
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png")[0].tolist() == [[255] * 3, [40] * 3]

    palette = Image.new("P", (2, 1))
    palette.putpalette([71, 112, 76, 200, 10, 10] + [0] * 762)  # entry 0 (transparent) is Twemoji's dark green
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency ... should be converted to RGBA"
        assert _rgb(tmp_path / "p.png")[0].tolist() == [[255] * 3, [200, 10, 10]]

    opaque = np.full((2, 2, 3), (12, 34, 56), np.uint8)
    Image.fromarray(opaque).save(tmp_path / "rgb.png")
    assert (_rgb(tmp_path / "rgb.png") == opaque).all()  # nothing to composite


def test_a_16_bit_pgm_of_dark_values_is_read_as_16_bit(tmp_path):
    """PIL opens a 16-bit PGM as mode I; its values were taken for 8-bit ones when none passed 255, so a
    nearly black image (values <= 250 of 65535) came out mid-grey, unlike the same samples in a PNG."""
    samples = np.linspace(0, 250, 64).reshape(8, 8).astype(">u2")
    (tmp_path / "d.pgm").write_bytes(b"P5\n8 8\n65535\n" + samples.tobytes())
    Image.fromarray(samples.astype(np.uint16)).save(tmp_path / "d.png")
    pgm, png = _rgb(tmp_path / "d.pgm"), _rgb(tmp_path / "d.png")
    assert (pgm == png).all() and pgm.max() == 1  # 250 * 255 / 65535 = 0.97
    # a PGM of maximum value 1023 (10 bits) is scaled to 16 bits by PIL: its full range is 0..255 here
    (tmp_path / "ten.pgm").write_bytes(b"P5\n8 8\n1023\n" + (samples * 4).astype(">u2").tobytes())
    assert _rgb(tmp_path / "ten.pgm")[0, 0, 0] == 0 and _rgb(tmp_path / "ten.pgm").max() == round(1000 * 255 / 1023)


def test_a_float_image_overshooting_1_is_still_read_as_0_to_1(tmp_path):
    """A [0, 1] float TIFF with one bicubic overshoot (1.02) was read as [0, 255]: all but black."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "ramp.tif")
    over = ramp.copy()
    over[0, 0] = 1.02
    Image.fromarray(over, "F").save(tmp_path / "over.tif")
    plain, overshot = _rgb(tmp_path / "ramp.tif"), _rgb(tmp_path / "over.tif")
    assert plain[-1, -1, 0] == 255 and overshot[0, 0, 0] == 255  # clipped
    assert (plain[1:] == overshot[1:]).all() and (plain[0, 1:] == overshot[0, 1:]).all()
    Image.fromarray(ramp * 200, "F").save(tmp_path / "wide.tif")  # [0, 200]: values as they are
    assert _rgb(tmp_path / "wide.tif")[-1, -1, 0] == 200


def _folder(root: Path, files: list[str]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (9, 99, 199)).save(root / rel, format="PNG")
    return root


def test_a_class_folder_linking_to_the_image_folder_itself_is_refused(tmp_path):
    """self -> . was one more class holding every image, each trained twice, once under the label 'self'."""
    root = _folder(tmp_path / "images", ["a/0.png", "b/0.png"])
    (root / "self").symlink_to(".")
    with pytest.raises(UserError, match=r"class folder .*self is a link to .*which holds the image folder .* "
                                        r"itself: its images would train twice, once under the label 'self'"):
        ImageFolder(root, 8)
    (root / "self").unlink()
    (root / "up").symlink_to("..")  # a folder above the root: it holds the root too
    with pytest.raises(UserError, match="class folder .*up is a link to"):
        ImageFolder(root, 8)
    (root / "up").unlink()
    assert [c for c in ImageFolder(root, 8).classes] == ["a", "b"]


def test_files_of_other_suffixes_in_class_folders_are_named_in_a_note(tmp_path, capsys):
    """A class of GIFs beside one JPEG trained on the JPEG alone; only the image count showed it."""
    root = _folder(tmp_path / "images", ["a/0.png", "a/1.gif", "a/deep/2", "b/0.png"])
    (root / "a" / ".DS_Store").write_bytes(b"\0")  # metadata: not counted
    (root / "b" / "._0.png").write_bytes(b"\0")
    ds = ImageFolder(root, 8)
    assert len(ds) == 2 and ds.skipped_files == [root / "a" / "1.gif", root / "a" / "deep" / "2"]
    assert ds.skipped_note().startswith(f"2 files with other suffixes in the class folders are not read (e.g. "
                                        f"{root / 'a' / '1.gif'}); images are files ending .jpg,")
    assert ImageFolder(_folder(tmp_path / "clean", ["a/0.png"]), 8).skipped_note() is None

    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "data.dataset=image_folder",
            "--set", f"data.root={root}", "--set", "train.sample_every=0", "--set", "data.num_classes=2",
            "--set", "model.num_classes=2", "--set", "diffusion.null_label=2", "--set", "train.batch_size=2"]
    assert main(args) == 0
    note = f"note: 2 files with other suffixes in the class folders are not read (e.g. {root / 'a' / '1.gif'})"
    assert f"zoo train: {note}" in capsys.readouterr().out


def test_a_plain_text_pgm_and_a_transparent_16_bit_png_are_read_at_scale(tmp_path):
    """A plain (P2) PGM of maximum value 65535 was read as 8-bit (its decoder is ppm_plain, not ppm), and a
    16-bit PNG's transparent grey level came out black, where every other mode's transparency is white."""
    (tmp_path / "p2.pgm").write_text("P2\n3 1\n65535\n200 65535 0\n")
    (tmp_path / "p5.pgm").write_bytes(b"P5\n3 1\n65535\n" + np.array([200, 65535, 0], ">u2").tobytes())
    assert (_rgb(tmp_path / "p2.pgm") == _rgb(tmp_path / "p5.pgm")).all()
    assert _rgb(tmp_path / "p2.pgm")[0, :, 0].tolist() == [1, 255, 0]  # 200 * 255 / 65535 = 0.78
    Image.fromarray(np.array([[0, 1000, 65535]], np.uint16)).save(tmp_path / "t16.png", transparency=0)
    assert _rgb(tmp_path / "t16.png")[0, :, 0].tolist() == [255, 4, 255]  # transparent 0: white; 1000: 3.9


def test_tiles_as_plain_tuples_are_read_as_older_pillow_gives_them(tmp_path):
    """Pillow before 11 gives a tile as a plain 4-tuple, not a named one: reading .codec_name was an
    AttributeError (a traceback for every mode-I image)."""
    (tmp_path / "d.pgm").write_bytes(b"P5\n2 1\n65535\n" + np.array([200, 65535], ">u2").tobytes())
    with Image.open(tmp_path / "d.pgm") as im:
        im.tile = [tuple(tile) for tile in im.tile]
        assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [1, 255]
