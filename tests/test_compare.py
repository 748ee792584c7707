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


def _recording_precision(monkeypatch) -> list:
    """Replace compare's inference_precision with one that also keeps a stack of the (precision, device) in force."""
    from zoo import compare

    real, active = compare.inference_precision, []

    @__import__("contextlib").contextmanager
    def recording(precision, device):
        active.append((precision, torch.device(device).type))
        try:
            with real(precision, device):
                yield
        finally:
            active.pop()

    monkeypatch.setattr(compare, "inference_precision", recording)
    return active


def test_the_timed_calls_run_in_the_arithmetic_zoo_train_and_zoo_sample_run(monkeypatch):
    """compare timed every step in exact fp32 where zoo train runs train.tf32 (default true) and every NFE
    without sample.precision (tf32 in the dit_* recipes): on CUDA the step was several times slower than trained."""
    active = _recording_precision(monkeypatch)
    seen = []
    for extra, step_precision in [([], "tf32"), (["train.tf32=false"], "fp32")]:
        bench = Bench(TINY[0], [*extra, "sample.precision=bf16"], 2, torch.device("cpu"))
        linear = next(m for m in bench.model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda module, args, out: seen.append((list(active), out.dtype)))
        bench.step()
        assert seen[-1] == ([(step_precision, "cpu")], torch.float32)  # train.tf32's switch, for the whole step
        bench.nfe()
        assert seen[-1] == ([("bf16", "cpu")], torch.bfloat16)  # the recipe's sample.precision: real autocast
    assert Bench(TINY[0], [], 2, torch.device("cpu")).sample_precision is None  # none given: the process's own
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    measure(TINY[:1], ["sample.precision=tf32"], batch=2, device="cpu", warmup=0, repeats=1)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_nfe_rounds_switch_to_eval_once_outside_the_timed_calls(monkeypatch):
    """ms/NFE timed an eval()/train() walk over every module with each model call."""
    mode_switches, states, benches = [], [], []
    train = torch.nn.Module.train
    nfe = Bench.nfe
    inside = []

    def counting_train(self, mode=True):
        if inside:
            mode_switches.append(mode)
        return train(self, mode)

    def recording_nfe(self):
        inside.append(1)
        try:
            states.append(self.model.training)
            benches.append(self)
            nfe(self)
        finally:
            inside.pop()

    monkeypatch.setattr(torch.nn.Module, "train", counting_train)
    monkeypatch.setattr(Bench, "nfe", recording_nfe)
    monkeypatch.setattr("zoo.compare._cpu_step_peak_bytes", lambda fn: 0)
    measure(TINY, batch=2, device="cpu", warmup=1, repeats=2)
    assert len(states) == 2 * 3 and not any(states)  # every NFE in eval mode
    assert mode_switches == []  # and no mode walk inside a timed call
    assert all(b.model.training for b in benches)  # back in training mode after


def _step_bytes(recipe: str, overrides: list[str], batch: int) -> tuple[int, int]:
    """(resident bytes, a step's gradient + activation bytes) of a recipe, as zoo.memory estimates them."""
    from zoo.memory import estimate
    from zoo.training.loop import set_grad_checkpointing

    resolved = zoo.load_recipe(recipe, overrides)
    with torch.device("meta"):
        model = zoo.build_model(resolved)
    if (resolved.get("train") or {}).get("grad_checkpointing"):
        set_grad_checkpointing(model, True)
    est = estimate(model, training=True, ema=False)
    return est.fixed - 4 * est.params, 4 * est.params + est.per_sample * batch


def test_the_memory_check_estimates_with_the_grad_checkpointing_the_step_runs(monkeypatch):
    """`zoo compare uvit_m_4 --batch 100` was refused ('needs about 24.6 GiB'): the estimate left out the
    recomputation its timed step runs with (about 5.8 GiB)."""
    from zoo import memory
    from zoo.commands.compare import check_memory

    recomputed = ["train.grad_checkpointing=true"]
    plain, checkpointed = (sum(_step_bytes(TINY[1], extra, 64)) for extra in ([], recomputed))
    assert checkpointed < 0.6 * plain
    monkeypatch.setattr(memory, "available_bytes", lambda device: checkpointed)
    check_memory([TINY[1]], recomputed, 64, "cpu")  # fits, as the recomputing step does
    monkeypatch.setattr(memory, "available_bytes", lambda device: checkpointed - 1)
    with pytest.raises(zoo.UserError, match=r"use --batch 6\d or less"):
        check_memory([TINY[1]], recomputed, 64, "cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 6 * 2**30)
    check_memory(["uvit_m_4"], [], 100, "cpu")  # the report's case: about 5.8 GiB with its recomputation


def test_the_memory_check_counts_every_recipe_resident_at_once(monkeypatch, capsys):
    """Each recipe was checked alone, but measure() keeps every model and its AdamW state alive together."""
    from zoo import compare, memory

    batch = 64
    sizes = [_step_bytes(r, [], batch) for r in TINY]
    alone = max(resident + step for resident, step in sizes)
    together = sum(resident for resident, _ in sizes) + max(step for _, step in sizes)
    assert together > alone
    monkeypatch.setattr(compare, "Bench", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(memory, "available_bytes", lambda device: together - 1)  # each alone would fit
    assert main(["compare", *TINY, "--batch", str(batch), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"timing {TINY[0]}, {TINY[1]} together at --batch {batch} needs about" in err
    assert "compare fewer recipes at a time, use --batch " in err and err.count("\n") == 1
    fits = int(re.search(r"use --batch (\d+) or less", err).group(1))
    assert fits < batch
    from zoo.commands.compare import check_memory

    check_memory(TINY, [], fits, "cpu")  # the batch it names fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: together)
    check_memory(TINY, [], batch, "cpu")  # and the sum is what it asks for


def test_an_svg_or_pdf_plot_path_that_cannot_be_written_is_refused_before_any_timing(capsys, monkeypatch):
    """`--plot /sys/cmp.pdf` timed everything, then failed naming a hidden temporary file, and the table was lost."""
    monkeypatch.setattr("zoo.compare.measure", lambda *a, **k: pytest.fail("timed before checking --plot"))
    for plot in ("/sys/cmp.pdf", "/sys/cmp.svg"):
        assert main(["compare", *TINY, "--batch", "2", "--plot", plot]) == 2
        err = capsys.readouterr().err
        assert f"--plot {plot}: cannot write in /sys" in err and err.count("\n") == 1


def test_only_a_plot_whose_creator_field_is_zoo_compare_is_replaced(tmp_path, capsys):
    """`--plot notes.svg` replaced a user's file that merely contained the text 'zoo compare'."""
    from zoo.compare import a_zoo_plot

    svg = tmp_path / "notes.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><text>made with zoo compare</text></svg>')
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Title (zoo compare) /Creator (my editor) >>\nendobj\n"
                    b"2 0 obj\n<< /Creator (zoo compare) >>\nendobj\ntrailer\n<< /Size 3 /Info 1 0 R >>\n%%EOF\n")
    for notes in (svg, pdf):
        before = notes.read_bytes()
        assert not a_zoo_plot(notes)
        assert main(["compare", TINY[0], "--no-time", "--plot", str(notes)]) == 2
        assert "exists and is a file zoo did not write" in capsys.readouterr().err
        assert notes.read_bytes() == before
        ours = notes.with_name("ours" + notes.suffix)
        assert main(["compare", TINY[0], "--no-time", "--plot", str(ours)]) == 0
        assert a_zoo_plot(ours)  # what zoo writes carries the field, so a rerun replaces it
        assert main(["compare", TINY[0], "--no-time", "--plot", str(ours)]) == 0


def test_plot_labels_tell_recipes_with_the_same_file_name_apart(tmp_path, monkeypatch):
    """Two recipes named dit.yaml were both labelled 'dit' in the plot."""
    import matplotlib.axes

    from zoo.compare import Row, plot, plot_labels

    assert plot_labels(["recipes/emoji32/dit.yaml", "recipes/imagenet/dit.yaml", "uvit.yaml", "dit_xl_2"]) == \
        ["emoji32/dit", "imagenet/dit", "uvit", "dit_xl_2"]
    assert plot_labels(["x/a/dit.yaml", "y/a/dit.yaml"]) == ["x/a/dit", "y/a/dit"]
    labels = []
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: (labels.append(text),
                                                                                          annotate(self, text, *a, **k))[1])
    rows = [Row("a/dit.yaml", 10**6, 10**6, 1.0), Row("b/dit.yaml", 2 * 10**6, 2 * 10**6, 2.0)]
    plot(rows, tmp_path / "cmp.png")
    assert labels == ["a/dit", "b/dit"]


def test_the_table_aligns_names_of_wide_characters():
    """Widths were counted in characters: a name of CJK characters (two columns each) pushed its row's numbers right."""
    from zoo.compare import Row, display_width

    rows = [Row("模型/扩散.yaml", 1234, 1234, 0.5), Row("ab.yaml", 5, 5, 2.0), Row("e\u0301.yaml", 7, 7, 1.0)]
    lines = format_table(rows).splitlines()
    assert display_width("模型/扩散.yaml") == 14 and display_width("e\u0301") == 1
    assert len({display_width(line) for line in lines}) == 1  # every row as wide as the header
    ends = {display_width(line[:line.index(str(n)) + len(str(n))]) for line, n in zip(lines[2:], ("1,234", 5, 7))}
    assert len(ends) == 1  # the params column ends in one terminal column


def test_a_base_recipe_file_is_named_as_one(capsys):
    """`zoo compare recipes/emoji32/*.yaml` (the command's own example) failed with 'the recipe has no model
    section' for _base_emoji32.yaml, which the other emoji32 recipes include."""
    base = ROOT / "recipes" / "emoji32" / "_base_emoji32.yaml"
    for timing in (["--no-time"], ["--batch", "2"]):  # timed, the memory check read it first: the old message
        assert main(["compare", str(ROOT / "recipes" / "emoji32" / "dit.yaml"), str(base), *timing]) == 2
        err = capsys.readouterr().err
        assert f"{base} is a base file" in err and "leave it out, e.g. " in err and "[!_]*.yaml" in err
    import zoo.commands.compare

    assert "recipes/emoji32/*.yaml" not in zoo.commands.compare.__doc__


def test_a_recipe_zoo_build_refuses_against_its_model_is_refused_too(capsys):
    """static_row validated the sections but not the recipe against the model: a DiMR fed DiT's time index
    got a row, though zoo build, train and sample refuse it."""
    assert main(["compare", TINY[1], "--set", "diffusion.time_input=dit_index", "--no-time"]) == 2
    err = capsys.readouterr().err
    assert "key diffusion.time_input" in err and "feeds DiMR a time on another scale" in err


def test_a_run_directory_that_is_not_there_is_named_as_missing_not_as_a_recipe(tmp_path, capsys, monkeypatch):
    """`zoo compare runs/dimr ...` with no such run said 'recipe file not found ... did you mean dimr_m_3r.yaml'."""
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "runs/dimr", "--no-time"]) == 2
    err = capsys.readouterr().err
    assert "runs/dimr does not exist (no run directory, checkpoint directory or recipe file there)" in err, err
    assert main(["compare", "emoji32/dit", "--no-time"]) == 0  # a shipped recipe's relative name still works
    capsys.readouterr()
    assert main(["compare", "runs/dimr.yaml", "--no-time"]) == 2  # a recipe name keeps the recipe suggestions
    assert "did you mean dimr_m_3r.yaml" in capsys.readouterr().err
    assert main(["compare", "dimr_m_3", "--no-time"]) == 2  # a bare mistyped name is a recipe's, not a path
    err = capsys.readouterr().err
    assert "recipe file not found" in err and "did you mean dimr_m_3r.yaml" in err and "does not exist" not in err, err
