"""``zoo compare``: the --json contract, interleaved timing, meta-device speed, memory, Table 2, the plot."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.compare import KEYS, PAPER_TABLE2_PARAMS_M, Bench, _cpu_step_peak_bytes, format_table, measure, \
    static_row, time_interleaved

ROOT = Path(__file__).parent.parent
TINY = [str(Path(__file__).parent / "recipes" / name) for name in ("tiny_train.yaml", "tiny_dimr_pixels.yaml")]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_json_has_the_contract_keys_in_order_and_real_figures(capsys):
    assert main(["compare", *TINY, "--json", "--batch", "2", "--warmup", "1", "--repeats", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [list(r) for r in rows] == [list(KEYS)] * 2
    assert list(KEYS) == ["recipe", "params", "trainable_params", "gflops", "train_step_ms", "peak_mem_mb",
                          "sample_ms_per_nfe"]
    for recipe, row in zip(TINY, rows):
        model = zoo.build_model(recipe)
        assert row["recipe"] == recipe
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert row["gflops"] > 0 and row["train_step_ms"] > 0 and row["sample_ms_per_nfe"] > 0
        # at least: weights, and for trainable ones AdamW's two moments and the gradients (float32)
        floor_mb = 4 * (row["params"] + 3 * row["trainable_params"]) / 2**20
        assert floor_mb < row["peak_mem_mb"] < floor_mb + 8  # + activations of batch 2: well under 8 MB here
    assert rows[0]["params"] == 41868 + 512  # the tiny DiT: trainable + its frozen position table


def test_timing_goes_round_robin():
    calls = []
    tasks = {name: (lambda n=name: calls.append(n)) for name in "ABC"}
    ticks = iter(range(100))
    times = time_interleaved(tasks, warmup=1, repeats=2, clock=lambda: float(next(ticks)))
    assert calls == list("ABCABCABC")
    assert times == {"A": [1.0, 1.0], "B": [1.0, 1.0], "C": [1.0, 1.0]}


def test_measure_interleaves_the_recipes_training_steps(monkeypatch):
    order = []
    step = Bench.step

    def recording(self):
        order.append(self.recipe["model"]["type"])
        step(self)

    monkeypatch.setattr(Bench, "step", recording)
    monkeypatch.setattr("zoo.compare._cpu_step_peak_bytes", lambda fn: 0)
    rows = measure(TINY, batch=2, device="cpu", warmup=1, repeats=2)
    assert order == ["dit", "dimr"] * 3
    assert all(r.train_step_ms > 0 for r in rows)


def test_the_timed_step_recomputes_and_autocasts_as_the_recipe_trains():
    """train.grad_checkpointing and train.precision were ignored: uvit_m_4 (which trains with
    recomputation) was timed and sized without it (tiny DiMR at batch 16: 19.6 MB either way, 8.0 MB recomputed)."""
    cpu = torch.device("cpu")
    plain, recomputed = (Bench(TINY[1], extra, 16, cpu) for extra in ([], ["train.grad_checkpointing=true"]))
    for bench in (plain, recomputed):
        bench.step()  # AdamW's state exists from here on, in both
    assert _cpu_step_peak_bytes(recomputed.step) < 0.7 * _cpu_step_peak_bytes(plain.step)
    bf16 = Bench(TINY[1], ["train.precision=bf16"], 2, cpu)
    dtypes = []
    linear = next(m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    bf16.step()
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_cpu_peak_memory_sees_torch_allocations():
    def step():
        a = torch.ones(2**22)  # 16 MiB
        b = a * 2  # another 16 MiB while a is alive
        del a, b

    peak = _cpu_step_peak_bytes(step)
    assert 32 * 2**20 <= peak < 33 * 2**20


def test_no_time_is_seconds_for_two_paper_recipes(capsys):
    start = time.process_time()
    assert main(["compare", "dimr_xl_2r", "dit_xl_2", "--no-time", "--json"]) == 0
    assert time.process_time() - start < 15
    rows = json.loads(capsys.readouterr().out)
    assert [(r["params"], round(r["gflops"], 2)) for r in rows] == [(505_046_408, 160.18), (675_129_632, 118.62)]
    assert all(r[k] is None for r in rows for k in ("train_step_ms", "peak_mem_mb", "sample_ms_per_nfe"))


def test_ablation_rows_print_the_paper_params_and_the_readme_agrees():
    recipes = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))
    assert {r.stem for r in recipes} == set(PAPER_TABLE2_PARAMS_M)
    rows = [static_row(str(recipes[0]))]
    table = format_table(rows)
    assert "paper (T2)" in table and "130.9M" in table and "130,940,292" in table
    assert "paper" not in format_table([static_row(TINY[0])])
    readme = (ROOT / "README.md").read_text()
    in_readme = dict(re.findall(r"^\| \d \| `(row\d_\w+)` .*\| ([\d.]+)M \|$", readme, flags=re.M))
    assert {k: float(v) for k, v in in_readme.items()} == PAPER_TABLE2_PARAMS_M


def test_plot_is_written_whole(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", *TINY, "--no-time", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.png"]  # no temporary file left
    assert main(["compare", *TINY, "--no-time", "--plot", str(out)]) == 0  # zoo's own plot: replaced on a rerun
    upper = tmp_path / "CMP.PNG"  # any case of the suffix is a PNG, and tagged as zoo's
    assert main(["compare", *TINY, "--no-time", "--plot", str(upper)]) == 0
    assert main(["compare", *TINY, "--no-time", "--plot", str(upper)]) == 0
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "mine.png")  # a user's picture is not
    assert main(["compare", *TINY, "--no-time", "--plot", str(tmp_path / "mine.png")]) == 2
    assert "mine.png exists and is a PNG zoo did not write" in capsys.readouterr().err
    for suffix in ("svg", "pdf"):  # the same for the other formats: zoo's plot replaced, a user's file kept
        plot = tmp_path / f"cmp.{suffix}"
        assert main(["compare", *TINY, "--no-time", "--plot", str(plot)]) == 0
        assert main(["compare", *TINY, "--no-time", "--plot", str(plot)]) == 0
        (tmp_path / f"mine.{suffix}").write_text("my figure")
        assert main(["compare", *TINY, "--no-time", "--plot", str(tmp_path / f"mine.{suffix}")]) == 2
        assert f"mine.{suffix} exists and is a file zoo did not write" in capsys.readouterr().err
        assert (tmp_path / f"mine.{suffix}").read_text() == "my figure"


def test_a_plot_path_that_cannot_be_written_is_refused_before_any_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("zoo.compare.measure", lambda *a, **k: pytest.fail("timed before checking --plot"))
    (tmp_path / "notes.png").write_text("my notes")
    from zoo.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", torch.nn.Linear(1, 1), {})  # a plot in it would fail its next save
    for plot, words in [(tmp_path / "p.txt", "give a path ending in .png, .svg, .pdf"),
                        (tmp_path / "notes.png", "exists and is not a PNG image"),
                        (tmp_path / "notes.png" / "p.svg", "is a file, not a directory"),
                        (tmp_path / "ckpt" / "p.svg", "is inside the checkpoint directory")]:
        assert main(["compare", *TINY, "--plot", str(plot)]) == 2
        assert words in capsys.readouterr().err
