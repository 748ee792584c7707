"""Pins on what the ``zoo build``, ``eval``, ``convert``, ``export`` and ``list`` commands and the ``zoo`` entry
point print, write and refuse (``zoo/commands/*.py``, ``zoo/cli.py``) that no other test held, each found
by a mutation that the suite let through: ``zoo build --json``'s default table depth and its ``convention``
key, ``--convention`` refused without ``--flops``, ``zoo eval --json`` keeping its notes on stderr,
``zoo convert``'s override note only where nothing was checked and its ``_config`` keys files, ``zoo
export``'s ``--n`` refusal and ``.NPZ`` suffix, ``zoo list``'s counts and sections, and the CLI's argument
types, 'unrecognized arguments' hint and reader-gone handling. A script reads these outputs (a JSON key,
an exit status, stderr), so a change to them breaks it silently. Everything runs in-process on tiny
models (the meta device, or a golden tiny U-ViT), well under a second each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo import cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def zoo(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_json_by_module_is_the_depth_2_table_by_default(capsys):
    """``--depth`` defaults to 2 (as its help says): the per-module breakdown a script reads names
    ``blocks.0`` but not ``blocks.0.attn``; a default of 3 tripled the keys and changed every report."""
    code, out, _ = zoo(capsys, "build", TINY_DIT, "--json")
    assert code == 0
    keys = set(json.loads(out)["by_module"])
    assert {"blocks", "blocks.0", "blocks.1", "final_layer.linear"} <= keys
    assert max(key.count(".") for key in keys) == 1
    code, out, _ = zoo(capsys, "build", TINY_DIT, "--json", "--depth", "2")
    assert code == 0 and set(json.loads(out)["by_module"]) == keys


def test_build_json_records_a_non_default_flop_convention(capsys):
    """``--convention official`` GFLOPs are not comparable with the default multiply-adds: the JSON says
    ``"convention": "official"`` (and says nothing for macs, the default); without it a table of papers'
    figures mixed both counts unawares."""
    code, out, _ = zoo(capsys, "build", TINY_DIT, "--json", "--convention", "official")
    assert code == 0 and json.loads(out)["convention"] == "official"
    code, out, _ = zoo(capsys, "build", TINY_DIT, "--json")
    assert code == 0 and "convention" not in json.loads(out)


def test_build_refuses_a_convention_without_flops(capsys):
    """``--convention`` only sets how --flops counts: alone it was silently ignored (the user believed the
    parameter count was 'official'); it is a one-line error with exit status 2 and nothing on stdout."""
    code, out, err = zoo(capsys, "build", TINY_DIT, "--convention", "official")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("zoo: error: --convention official: it sets how --flops counts")


def test_eval_json_keeps_warnings_and_notes_on_stderr_and_drops_progress(capsys):
    """Under ``--json`` stdout is the result alone; a note (a reference at another resolution than the
    samples) must still reach stderr: dropping it hid why an FD was not comparable."""
    from zoo.commands.eval import _json_log

    _json_log("zoo eval: sampling 64 images")
    _json_log("zoo eval: note: the reference is 64x64, the samples 32x32; both are resized")
    _json_log("zoo eval: warning: 10 samples are too few")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["zoo eval: note: the reference is 64x64, the samples 32x32; both are resized",
                                "zoo eval: warning: 10 samples are too few"]


def test_convert_with_an_official_config_does_not_say_overrides_went_unchecked(tmp_path, capsys):
    """With ``--config`` the recipe's model is compared with the official constructor kwargs, a ``--set model.*``
    included: the note that such a setting 'cannot be checked against the weights' is for conversions without
    one. Printed here too, it told the user to distrust a conversion that had been checked."""
    import torch

    root = Path(__file__).resolve().parents[1]
    golden = torch.load(root / "tests" / "golden" / "golden_uvit_tiny.pt", weights_only=True)
    (tmp_path / "config.json").write_text(json.dumps(golden["config"]))
    torch.save(golden["state_dict"], tmp_path / "official.pt")
    recipe = tmp_path / "uvit_tiny.yaml"
    recipe.write_text(json.dumps({
        "_base_": str(root / "recipes" / "_base_uvit.yaml"),
        "model": {"img_size": 16, "patch_size": 2, "in_chans": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
                  "num_classes": 11},
        "data": {"num_classes": 10, "image_size": 128, "latent": True}}))
    code, out, err = zoo(capsys, "convert", "uvit", tmp_path / "official.pt", "--recipe", recipe,
                         "--set", "model.depth=4", "--config", tmp_path / "config.json", "--out", tmp_path / "checked")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'checked'}") and "changed the recipe's model" not in out
    # (without --config the note is printed: test_convert_dit.py::test_weights_of_another_precision_are_said_to_be_cast)


def test_convert_config_reads_the_kwargs_a_keys_file_carries_beside_its_keys(tmp_path):
    """``--config`` may name a keys file (tests/golden/keys/dimr_xl_2r.json): its constructor kwargs are under
    ``_config`` beside the tensor shapes. Read only under ``config``, the whole key listing was taken as the
    kwargs and DiMR's converter failed on a missing 'stage_configs'."""
    import argparse

    from zoo.commands.convert import official_config

    keys = Path(__file__).parent / "golden" / "keys" / "dimr_xl_2r.json"
    expected = json.loads(keys.read_text())["_config"]
    assert "stage_configs" in expected
    assert official_config(argparse.Namespace(config=keys), None) == expected
    (tmp_path / "wrapped.json").write_text(json.dumps({"config": {"depth": 3}}))
    assert official_config(argparse.Namespace(config=tmp_path / "wrapped.json"), None) == {"depth": 3}
    assert official_config(argparse.Namespace(config=None), {"config": {"depth": 4}, "model": {}}) == {"depth": 4}


def test_export_diffusers_refuses_n_before_reading_the_checkpoint(tmp_path, capsys):
    """``--n`` counts samples of ``zoo export npz``; given to diffusers it is refused by name (one line, exit 2)
    rather than silently ignored, and before the checkpoint is looked at (here there is none)."""
    code, out, err = zoo(capsys, "export", "diffusers", tmp_path / "ckpt", "--out", tmp_path / "d", "--n", "5")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--n is an option of zoo export npz (how many samples), not of diffusers" in err
    assert not (tmp_path / "d").exists()


def test_export_npz_takes_an_upper_case_suffix(tmp_path, capsys):
    """``--out batch.NPZ`` is an .npz file (as zoo sample takes g.PNG): a case-sensitive check refused it."""
    import numpy as np

    from zoo.eval.reference import save_npz

    samples = tmp_path / "samples-last-abc"
    samples.mkdir()
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    save_npz(samples / "shard-0000000-0000002.npz", images=images, indices=np.arange(2))
    code, out, err = zoo(capsys, "export", "npz", samples, "--out", tmp_path / "batch.NPZ")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'batch.NPZ'} (2 samples 4x4: arr_0 images;")
    np.testing.assert_array_equal(np.load(tmp_path / "batch.NPZ")["arr_0"], images)
    code, _, err = zoo(capsys, "export", "npz", samples, "--out", tmp_path / "batch.zip")
    assert code == 2 and "the sample batch is an .npz file" in err


def test_list_counts_a_name_two_distributions_claim_once(tmp_path, capsys):
    """The header ``blocks (...): N`` counts names, as ``registry.names`` does: a name two sources claim is two
    rows (one per source, to show the conflict) but one block; counting rows reported a block too many."""
    from fake_plugins import on_sys_path, write_distribution

    from zoo import registry

    write_distribution(tmp_path, "zoo-dup-plugin", "[zoo.blocks]\nmlp = zoo_fake_plugin:ScaleBlock\n")
    with on_sys_path(tmp_path):
        assert cli.main(["list", "block"]) == 0
        out = capsys.readouterr().out
        names = registry.names("block")
        rows = [e for e in registry.entries("block") if e.name == "mlp"]
    assert len(rows) == 2
    header = out.splitlines()[0]
    assert header.startswith("blocks (") and header.endswith(f"): {len(names)}")


def test_list_of_one_kind_verbose_leaves_out_the_recipe_sections(capsys):
    """``zoo list KIND -v`` shows that kind's components; the recipe section tables belong to the listing of
    everything (``zoo list -v``), not appended to every kind's listing."""
    assert cli.main(["list", "schedule", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("schedules (") and "recipe sections (besides model):" not in out


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "0", "-1e-3", "abc"])
def test_positive_float_refuses_infinity_as_well_as_zero_and_nan(text):
    """A rate or scale option (``--lr``) of ``inf`` trains to NaN after the first step: argparse refuses it
    like 0 or nan (a check of ``> 0`` alone let ``inf`` through), while a plain positive number passes."""
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float(text)
    assert cli.positive_float("2.5e-4") == 2.5e-4


def test_unrecognized_arguments_suggest_set_only_for_loose_overrides():
    """``zoo train R --set a=1 b=2 --lr=3``: ``b=2`` is an override that lost its ``--set`` and is told so; an
    unknown option ``--lr=3`` is not an override, and 'use --set --lr=3' sent the user to a wrong fix."""
    assert cli._unrecognized(["b=2", "--lr=3"]) == ("unrecognized arguments: b=2 --lr=3 "
                                                    "(each override takes its own --set: --set b=2)")
    assert cli._unrecognized(["--lr=3"]) == "unrecognized arguments: --lr=3"


class _GoneStream:
    """A stdout whose reader has gone: every write and flush fails with ``errno`` (its fd is a file of the test's,
    which ``_ReaderMayLeave`` points at /dev/null)."""

    def __init__(self, fd: int, errno_: int) -> None:
        self.fd, self.errno = fd, errno_

    def fileno(self) -> int:
        return self.fd

    def write(self, text: str) -> int:
        raise OSError(self.errno, "gone")

    def flush(self) -> None:
        raise OSError(self.errno, "gone")


def test_a_hung_up_terminal_is_a_reader_gone_said_once_and_a_full_disk_is_not(tmp_path, capsys):
    """A terminal that hung up fails writes with EIO, as a closed pipe does with EPIPE: the work goes on and
    one note says so (treating only EPIPE as gone ended an hours-long run unsaved at its next print). The
    note is said once, however many lines follow; any other error (ENOSPC on a redirected stdout) still
    raises."""
    import errno
    import os

    for code in (errno.EIO, errno.EPIPE):
        fd = os.open(tmp_path / f"out{code}", os.O_WRONLY | os.O_CREAT)
        try:
            stream = cli._ReaderMayLeave(_GoneStream(fd, code), "zoo train: stdout was closed; the run goes on")
            assert stream.write("step 1\n") == 7 and stream.write("step 2\n") == 7
            stream.flush()
        finally:
            os.close(fd)
        assert capsys.readouterr().err == "zoo train: stdout was closed; the run goes on\n"
    fd = os.open(tmp_path / "full", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as info:
            cli._ReaderMayLeave(_GoneStream(fd, errno.ENOSPC), "note").write("x")
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_convert_refuses_a_bad_out_before_reading_the_official_checkpoint(tmp_path, capsys):
    """``--out`` is checked before the official file is read (an XL checkpoint is gigabytes): a refused --out
    costs nothing. Read first, a typo in --out was found only after the load, and a bad input file hid it."""
    (tmp_path / "out").write_text("notes")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file" * 4)
    for source in ("missing.pt", "junk.pt"):
        code, out, err = zoo(capsys, "convert", "dit", tmp_path / source, "--recipe", TINY_DIT,
                             "--out", tmp_path / "out")
        assert code == 2 and out == ""
        assert err == (f"zoo: error: --out {tmp_path / 'out'} exists and is not a directory; zoo replaces only its own "
                       "checkpoints (choose another path)\n")
    assert (tmp_path / "out").read_text() == "notes"


def test_build_refuses_print_recipe_with_flops(capsys):
    """``--print-recipe`` prints the recipe and stops: with ``--flops`` the FLOP table the user asked for was
    silently never printed; it is refused in one line (as with ``--json``), exit 2, nothing on stdout."""
    code, out, err = zoo(capsys, "build", TINY_DIT, "--print-recipe", "--flops")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--print-recipe prints the recipe and stops; it does not combine with --json or --flops" in err
