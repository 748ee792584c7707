"""The loop a researcher expects: micro-batches, recomputed activations, torch.compile, fp16 with a
scaler, pruning of old checkpoints, a stop on non-finite losses, and resume refusing a changed model."""

import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

import zoo
import zoo.checkpoint as ckpt
from zoo.cli import main
from zoo.errors import UserError
from zoo.training import Trainer, train
from zoo.training.compile_check import check_compile_toolchain
from zoo.weights import load_weights

from tiny_run import plain_recipe

HERE = Path(__file__).parent / "recipes"
QUIET = lambda *_: None  # noqa: E731
SMALL = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1", "train.warmup_steps=0"]
UVIT = ["model.img_size=8", "model.patch_size=2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.num_classes=4", "data.dataset=synthetic", "data.size=16", "data.num_classes=4", "data.image_size=8"]
BACKBONES = {  # one tiny recipe per backbone
    "dit": (HERE / "tiny_train.yaml", []),
    "uvit": (Path(__file__).parents[1] / "recipes" / "uvit_m_4.yaml", UVIT),
    "dimr": (HERE / "tiny_dimr_pixels.yaml", ["data.dataset=synthetic", "data.size=16"]),
}


def one_step_grads(tmp_path, name="dit", *overrides):
    """Loss and gradients of the first optimizer step, the model in float64 (the optimizer step is skipped)."""
    path, base = BACKBONES[name]
    trainer = Trainer(zoo.load_recipe(path, [*base, *SMALL, "train.batch_size=8", *overrides]), tmp_path, log=QUIET)
    trainer.model.double()
    grads = {}
    trainer.optimizer.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    x, y = next(trainer.batches)
    loss = trainer.train_step(x.double(), y)
    assert grads, "no gradient reached the optimizer"
    return loss, grads, trainer


def assert_same_grads(a, b, rtol=1e-10):
    assert a.keys() == b.keys()
    for k in a:  # float64: only summation order differs, ~1e-16 relative per term
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-13, msg=k)


def test_grad_accum_gives_the_big_batch_gradient(tmp_path):
    loss1, g1, _ = one_step_grads(tmp_path / "a", "dit", "train.grad_accum=1")
    loss4, g4, _ = one_step_grads(tmp_path / "b", "dit", "train.grad_accum=4")
    torch.testing.assert_close(loss4, loss1, rtol=1e-12, atol=0)
    assert_same_grads(g1, g4)


@pytest.mark.parametrize("name", ["dit", "uvit", "dimr"])
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(tmp_path, name):
    loss0, g0, _ = one_step_grads(tmp_path / "a", name, "train.grad_checkpointing=false")
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    import zoo.backbones.dit as dit_mod
    import zoo.blocks.skip_stack as stack_mod

    saved = dit_mod.checkpoint, stack_mod.checkpoint
    dit_mod.checkpoint = stack_mod.checkpoint = torch.utils.checkpoint.checkpoint
    try:
        loss1, g1, _ = one_step_grads(tmp_path / "b", name, "train.grad_checkpointing=true")
    finally:
        torch.utils.checkpoint.checkpoint = orig
        dit_mod.checkpoint, stack_mod.checkpoint = saved
    assert calls, "no block went through activation checkpointing"
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert_same_grads(g0, g1, rtol=1e-12)


@pytest.fixture
def inductor():
    """A fresh dynamo cache, and inductor's C++ code scalar where ATen is forced to be; skips where
    inductor has no C++ compiler (a slim container): what a user gets there is tested below."""
    try:
        check_compile_toolchain(torch.device("cpu"))
    except UserError as err:
        pytest.skip(str(err))
    torch._dynamo.reset()
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        # torch 2.14's inductor still emits at::vec code when ATen is forced to scalar kernels, and
        # its precompiled header then lacks at::vec (C++ compile error); simdlen 1 = scalar codegen.
        inductor_config = importlib.import_module("torch._inductor.config")
        with inductor_config.patch({"cpp.simdlen": 1}):  # not monkeypatch: under pytest 9.2 its undo hides the setting
            yield
    else:
        yield
    torch._dynamo.reset()


def test_compile_without_a_cxx_compiler_is_one_message_before_the_run_starts(tmp_path, capsys):
    """Inductor on the CPU needs a C++ compiler; without one the first step was a long traceback."""
    inductor_config = importlib.import_module("torch._inductor.config")
    out = tmp_path / "run"
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        assert main(["train", str(HERE / "tiny_train.yaml"), "--out", str(out), "--steps", "1",
                     "--set", "train.compile=true"]) == 2
    err = capsys.readouterr().err
    assert "key train.compile: compiling on the CPU needs a C++ compiler" in err and "no-such-g++" in err, err
    assert "train.compile=false" in err and "Traceback" not in err
    assert not out.exists()  # refused before the run directory was made



def test_compile_for_cuda_without_a_c_compiler_is_refused_before_the_run(monkeypatch, tmp_path):
    """Triton builds its kernel launcher with a C compiler; the CUDA check asked only for Triton, so a slim CUDA
    image passed it and failed with a traceback at the first step."""
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler here
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(UserError, match=r"compiling for CUDA needs a C compiler .* \(install gcc or clang or point "):
        check_compile_toolchain(torch.device("cuda"))
    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    check_compile_toolchain(torch.device("cuda"))

@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit"])  # DiMR under compile: the dynamic-shapes test below (losses and gradients)
def test_compiled_model_gives_the_eager_loss(tmp_path, inductor, name):
    """The training loop's torch.compile (static shapes) gives the eager losses."""
    path, base = BACKBONES[name]
    tiny = [*base, *SMALL, "train.batch_size=8", *(["model.depth=1"] if name == "dit" else [])]
    eager = train(zoo.load_recipe(path, tiny), tmp_path / "a", steps=2, log=QUIET)
    compiled = train(zoo.load_recipe(path, [*tiny, "train.compile=true"]), tmp_path / "b", steps=2, log=QUIET)
    for e, c in zip(eager, compiled):  # float32; inductor fuses differently: ~1e-6 relative per op, a few ops deep
        assert abs(e["loss"] - c["loss"]) <= 1e-4 * abs(e["loss"]), (e, c)
    a = load_weights(tmp_path / "a" / "last" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "last" / "model.safetensors")
    assert a.keys() == b.keys()  # the compiled wrapper does not leak into the checkpoint's keys


@pytest.mark.slow
def test_a_dimr_compiled_with_dynamic_shapes_trains_like_eager(inductor):
    """torch.compile(model) in a user's own loop: the GeGLU autograd Function's backward writes into
    strided views, dynamo broke the graph there, recompiled for dynamic shapes and inductor failed
    ("cannot determine truth value of Relational"). Under compile the plain GeGLU is traced instead.
    One block per branch is enough to fail that way (checked with the Function forced back in)."""
    torch.manual_seed(0)
    model = zoo.build_model(dict(type="dimr", in_channels=3, input_size=8, num_classes=6, branches=[
        dict(dim=32, depth=1, patch_size=2, block=dict(type="transformer", num_heads=2, norm="td_rmsnorm", mlp="geglu_mlp")),
        dict(dim=16, depth=1, patch_size=1, block=dict(type="convnext", norm="td_rmsnorm", mlp="geglu_mlp"))]))
    compiled = torch.compile(model)
    for batch in (4, 6):  # the second batch size is what recompiles with dynamic shapes
        x, t, y = torch.randn(batch, 3, 8, 8), torch.rand(batch) * 8 - 4, torch.arange(batch) % 5
        losses = [sum(o.square().mean() for o in m(x, t, y)) for m in (model, compiled)]
        grads = []
        for loss in losses:
            model.zero_grad()
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        # float32: inductor fuses and reorders a few dozen ops; ~1e-6 relative each
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_fp16_with_grad_scaler_trains_and_resumes(tmp_path):
    r = zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.precision=fp16"])
    records = train(r, tmp_path, steps=3, log=QUIET)
    assert len(records) == 3 and all(0 < x["loss"] < 10 for x in records)
    state = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0 and state["step"] == 3  # no overflow on this tiny run
    more = train(r, tmp_path, steps=4, resume=tmp_path / "last", log=QUIET)
    assert [x["step"] for x in more] == [4]


def test_fp16_steps_that_are_all_skipped_stop_the_run_instead_of_finishing_untrained(tmp_path, capsys):
    """The scaler skips a step whose gradient overflows and halves its scale; when every step
    overflows (scale below 1 after 17 skips), the run stops (exit 1) rather than ending 'done'
    with its initial weights."""
    import zoo.training.loop as loop

    real = loop.Trainer._set_up

    def set_up(self, *args, **kwargs):
        dataset = real(self, *args, **kwargs)
        for p in (p for p in self.model.parameters() if p.requires_grad):  # an fp16 forward that always overflows
            p.register_hook(lambda g: torch.full_like(g, float("inf")))
        return dataset

    loop.Trainer._set_up = set_up
    try:
        code = main(["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path / "run"), "--set",
                     "train.precision=fp16", "--set", "train.steps=40", "--set", "train.sample_every=0", "--set", "train.grad_clip=1.0",
                     "--set", "train.ckpt_every=0", "--set", "train.batch_size=4"])
    finally:
        loop.Trainer._set_up = real
    err = capsys.readouterr().err
    assert code == 1 and "not finite at step 17" in err and "loss scale below 1" in err, err
    # bf16/fp32 is the fix; a lower lr or clipping cannot help steps that were all skipped (it suggested both)
    assert "). Use precision bf16 (or fp32) instead of fp16: this model's fp16 forward or backward overflows" in err
    assert "lower train.lr" not in err.lower() and "set train.grad_clip" not in err


def test_fp16_skipped_steps_are_counted_and_log_jsonl_stays_strict_json(tmp_path):
    """A skipped step's gradient norm is inf: it made the window's mean inf, written as Infinity (not JSON)."""
    import json

    out = tmp_path / "run"
    assert main(_args(out, "--set", "train.precision=fp16", "--set", "train.lr=5", "--set", "train.log_every=1",
                      "--set", "train.steps=6")) == 0
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
               for line in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped_steps")]
    assert skipped and all("grad_norm" not in r for r in skipped)  # each window here is one skipped step
    assert all(math.isfinite(r["grad_norm"]) for r in records if "grad_norm" in r)


def test_the_rms_norm_in_fp16_is_computed_in_float32():
    """fp16 rows with an RMS below 4e-3 overflowed r**2 in the norm's backward (every step non-finite)."""
    from zoo.conditioning.fused_rmsnorm import scaled_rms_norm

    torch.manual_seed(0)
    x = (torch.randn(4, 16, 96, dtype=torch.float64) * 1e-3).requires_grad_()
    gamma = (1 + 0.1 * torch.randn(4, 96, dtype=torch.float64)).requires_grad_()
    x16, g16 = x.detach().half().requires_grad_(), gamma.detach().half().requires_grad_()
    y, y16 = scaled_rms_norm(x, gamma, 1e-8), scaled_rms_norm(x16, g16, 1e-8)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y16.backward(upstream.half())
    assert y16.dtype == torch.float16 and torch.isfinite(x16.grad).all() and torch.isfinite(g16.grad).all()
    # fp16 in and out: ~2**-11 relative rounding of inputs, outputs and gradients (values O(1), grads O(1e3))
    torch.testing.assert_close(y16.double(), y, rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(x16.grad.double(), x.grad, rtol=1e-2, atol=1e-2 * x.grad.abs().max().item())


def test_the_last_partial_log_window_is_logged(tmp_path, capsys):
    """7 steps at log_every 5: a record at step 5 and one for steps 6-7, and a run shorter than
    log_every still logs (log.jsonl, loss.png) instead of leaving them empty."""
    import json

    r = zoo.load_recipe(HERE / "tiny_train.yaml", ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=5"])
    records = train(r, tmp_path / "a", steps=7, log=QUIET)
    assert [x["step"] for x in records] == [5, 7]
    logged = [json.loads(line)["step"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert logged == [5, 7]
    assert [x["step"] for x in train(r, tmp_path / "b", steps=3, log=QUIET)] == [3]
    assert (tmp_path / "b" / "loss.png").is_file()


def test_keep_last_prunes_only_the_runs_own_step_dirs(tmp_path):
    (tmp_path / "step_0000001").mkdir(parents=True)  # not the run's: kept
    (tmp_path / "step_0000001" / "notes.txt").write_text("mine")
    r = zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.ckpt_every=2", "train.keep_last=2"])
    train(r, tmp_path, steps=6, log=QUIET)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step_", "last")))
    assert names == ["last", "step_0000001", "step_0000004", "step_0000006"]
    train(r, tmp_path, steps=8, resume=tmp_path, log=QUIET)  # a resumed run remembers what it created
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step_", "last")))
    assert names == ["last", "step_0000001", "step_0000006", "step_0000008"]
    assert not list(tmp_path.glob("*.old-*")) and not list(tmp_path.glob("*.tmp-*"))


def test_keep_last_keeps_a_step_dir_holding_a_users_files(tmp_path):
    r = zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.ckpt_every=2", "train.keep_last=1"])
    train(r, tmp_path, steps=2, log=QUIET)
    (tmp_path / "step_0000002" / "NOTES.txt").write_text("mine")
    notes = []
    train(r, tmp_path, steps=6, resume=tmp_path, log=notes.append)
    assert (tmp_path / "step_0000002" / "NOTES.txt").read_text() == "mine"
    assert not (tmp_path / "step_0000004").exists() and (tmp_path / "step_0000006").is_dir()  # the rest pruned
    said = [n for n in notes if "step_0000002" in n and "not pruned" in n]
    assert len(said) == 1 and "NOTES.txt" in said[0], notes  # once: no longer counted as the run's


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    # lr 1e30: step 1 is finite and moves the weights to ~1e30, so step 2's loss overflows.
    out = tmp_path / "run"
    code = main(["train", str(HERE / "tiny_train.yaml"), "--out", str(out), "--set", "train.lr=1e30",
                 "--set", "train.warmup_steps=0", "--set", "train.ckpt_every=1", "--set", "train.sample_every=0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "not finite at step 2" in err and f"{out / 'last'} holds step 1" in err
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and not (out / "step_0000002").exists()
    weights = load_weights(out / "last" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    # the finite step before it is logged (log_every 5 would otherwise drop it): its huge loss says why
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and math.isfinite(records[0]["loss"])
    # Resumed into another directory and stopped before a save: the message names the checkpoint it came from.
    code = main(["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path / "again"), "--resume", str(out),
                 "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.ckpt_every=0",
                 "--set", "train.sample_every=0"])
    err = capsys.readouterr().err
    assert code == 1 and "not finite at step 2" in err and f"{out / 'last'} holds step 1" in err
    assert "). Lower train.lr or set train.grad_clip" in err  # the resumed weights come from updates at this lr


def test_a_non_finite_loss_before_the_first_update_does_not_blame_the_learning_rate(tmp_path):
    """Before the optimizer's first step (step 1 of a run, or later where fp16's scaler skipped every step)
    the weights are the ones the run started from: 'Lower train.lr' (said first, also under fp16) cannot
    help; fp16's range is what to try first. After an update the advice stays as it was."""
    from zoo.training.loop import NonFiniteError

    def message(before: str, precision: str = "fp16") -> str:
        """The message of a step on a batch whose loss is not finite, after no step, a skipped or a taken one."""
        trainer = Trainer(plain_recipe(f"train.precision={precision}"), tmp_path / before / precision, log=QUIET)
        if before != "none":
            first = next(p for p in trainer.model.parameters() if p.requires_grad)
            hook = first.register_hook(lambda g: torch.full_like(g, float("inf")) if before == "skipped" else g)
            trainer.train_step(*next(trainer.batches))  # skipped: a fused AdamW still makes its state (step 0)
            trainer.step += 1
            hook.remove()
        x, y = next(trainer.batches)
        with pytest.raises(NonFiniteError, match=f"the loss is not finite at step {trainer.step + 1}") as caught:
            trainer.train_step(x * float("inf"), y)
        return str(caught.value)

    fresh = " (no update was made yet: train.lr and train.grad_clip act only on updates)"
    assert message("none", "fp32").endswith("written). Check the model and diffusion sections" + fresh)
    assert message("none").endswith("written). Use precision bf16 (or fp32) instead of fp16 or check the model "
                                    "and diffusion sections" + fresh)
    assert message("skipped").endswith("written). Use precision bf16 (or fp32) instead of fp16 or check the "
                                       "model and diffusion sections" + fresh)
    assert message("taken").endswith("written). Lower train.lr, set train.grad_clip or use precision bf16 "
                                     "(or fp32) instead of fp16")


def test_resume_refuses_a_changed_model_or_diffusion_section(tmp_path, capsys):
    r = [*SMALL, "train.ckpt_every=0"]
    train(zoo.load_recipe(HERE / "tiny_train.yaml", r), tmp_path, steps=1, log=QUIET)
    argv = ["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path), "--resume", str(tmp_path), "--steps", "2",
            "--set", "train.sample_every=0"]
    capsys.readouterr()
    assert main([*argv, "--set", "diffusion.schedule.beta_end=0.03"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diffusion.schedule.beta_end" in err and "--allow-recipe-change" in err
    assert main([*argv, "--set", "model.depth=3"]) == 2
    assert "model.depth" in capsys.readouterr().err
    assert main([*argv, "--set", "diffusion.schedule.beta_end=0.03", "--allow-recipe-change"]) == 0
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    # allowed, and said (it resumed without a word): the weights now go on under another noise schedule
    assert ("zoo train: note: --allow-recipe-change: the recipe's diffusion.schedule.beta_end (0.02 -> 0.03) "
            "differs from the checkpoint's" in capsys.readouterr().out)


def test_resume_offers_allow_recipe_change_only_for_a_model_of_the_same_shapes(tmp_path, capsys):
    """A changed model.hidden_size was told 'or pass --allow-recipe-change', which then failed on the weights
    ('does not match the model; wrong shape keys: ... (23 in all)'), with no advice: a model of other shapes
    has no resume. A change that keeps the shapes (mlp.act) is still allowed."""
    train(zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "model.depth=1"]), tmp_path, steps=1, log=QUIET)
    argv = ["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path), "--resume", str(tmp_path), "--steps", "2",
            "--set", "train.sample_every=0", "--set", "model.depth=1"]
    capsys.readouterr()
    for allow in ([], ["--allow-recipe-change"]):
        assert main([*argv, "--set", "model.hidden_size=16", *allow]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zoo: error: key model.hidden_size: --resume {tmp_path / 'last'}: the recipe's "
                              "model.hidden_size (32 there, 16 now) differs from the checkpoint's and changes the "
                              "shapes of its weights (wrong shape keys: pos_embed (1, 16, 32) (model: (1, 16, 16)), ")
        assert err.endswith("a model of another shape cannot continue these weights (--allow-recipe-change applies "
                            "only to changes that keep them) (keep the model section as the run had it "
                            "(model.hidden_size: 32) to resume, or start a new run with another --out)\n")
    assert main([*argv, "--set", "model.depth=2"]) == 2  # more blocks: keys the checkpoint lacks
    assert "changes the shapes of its weights (missing keys: blocks.1." in capsys.readouterr().err
    assert main([*argv, "--set", "model.mlp={type: mlp, act: gelu}"]) == 2  # the same shapes: allowed where asked
    assert "or pass --allow-recipe-change if the change is intended" in capsys.readouterr().err
    assert main([*argv, "--set", "model.mlp={type: mlp, act: gelu}", "--allow-recipe-change"]) == 0
    assert "note: --allow-recipe-change: the recipe's model.mlp" in capsys.readouterr().out


def test_resume_keeps_the_moments_and_takes_the_recipes_optimizer_settings(tmp_path, capsys):
    """A resumed run continues the checkpoint's AdamW moments under the recipe's weight decay and betas;
    a recipe that groups the parameters differently is refused in one line."""
    r = [*SMALL, "train.weight_decay=0.0", "train.betas=[0.9, 0.999]"]
    train(zoo.load_recipe(HERE / "tiny_train.yaml", r), tmp_path, steps=1, log=QUIET)
    saved = torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["optimizer"]
    changed = zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.weight_decay=0.1", "train.betas=[0.8, 0.95]"])
    trainer = Trainer(changed, tmp_path / "again", resume=tmp_path, log=QUIET)
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.8, 0.95)
    moments = trainer.optimizer.state_dict()["state"]
    assert torch.equal(moments[0]["exp_avg"], saved["state"][0]["exp_avg"])

    argv = ["train", str(HERE / "tiny_train.yaml"), "--out", str(tmp_path / "third"), "--resume", str(tmp_path),
            "--steps", "2", "--set", "train.sample_every=0", "--set", "train.no_weight_decay_1d=true"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.no_weight_decay_1d differs from the checkpoint's" in err


def test_the_logged_gradient_norm_is_the_norm_before_clipping(tmp_path):
    _, grads, trainer = one_step_grads(tmp_path, "dit", "train.grad_clip=1e9")  # float64, nothing clipped
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    torch.testing.assert_close(trainer.grad_norm.double(), norm, rtol=1e-12, atol=0)
    _, clipped, trainer = one_step_grads(tmp_path / "clip", "dit", "train.grad_clip=1e-3")
    torch.testing.assert_close(trainer.grad_norm.double(), norm, rtol=1e-12, atol=0)  # still the norm before
    after = torch.sqrt(sum((g ** 2).sum() for g in clipped.values()))
    torch.testing.assert_close(after, 1e-3 * norm / (norm + 1e-6), rtol=1e-12, atol=0)  # torch's clip coefficient
    _, unclipped, trainer = one_step_grads(tmp_path / "none", "dit")  # no grad_clip: the norm alone is computed
    torch.testing.assert_close(trainer.grad_norm.double(), norm, rtol=1e-12, atol=0)
    assert_same_grads(unclipped, grads, rtol=0)



def _args(out, *extra):
    return ["train", str(HERE / "tiny_train.yaml"), "--out", str(out), "--set", "train.sample_every=0",
            "--set", "train.ckpt_every=2", *extra]


def test_resuming_another_run_into_a_run_directory_is_refused(tmp_path, capsys):
    """--out A --resume B would have replaced A's checkpoints and cut A's log at B's step."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(a, "--steps", "4")) == 0 and main(_args(b, "--steps", "2")) == 0
    before = (a / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(_args(a, "--resume", str(b), "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert f"--out {a} already holds a run (last/), and --resume {b} is another run's checkpoint" in err
    assert (a / "log.jsonl").read_text() == before
    # a --resume that is no checkpoint at all (a typo, an image folder) is named as that, not as another run's
    (tmp_path / "images").mkdir()
    assert main(_args(a, "--resume", str(tmp_path / "images"), "--steps", "3")) == 2
    assert capsys.readouterr().err == f"zoo: error: {tmp_path / 'images'} is not a zoo checkpoint (no config.json)\n"
    # Resuming A itself (its directory, last/ or a step) and forking B into a new directory still work.
    assert main(_args(a, "--resume", str(a / "step_0000002"), "--steps", "5")) == 0
    assert main(_args(tmp_path / "fork", "--resume", str(b / "last"), "--steps", "3")) == 0


def test_out_may_not_be_a_checkpoint_or_inside_one(tmp_path, capsys):
    """--out J/last --resume J/last nested a whole run inside J's checkpoint (exit 0)."""
    j = tmp_path / "j"
    assert main(_args(j, "--steps", "2")) == 0
    before = sorted(p.name for p in (j / "last").iterdir())
    capsys.readouterr()
    assert main(_args(j / "last", "--resume", str(j / "last"), "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert err == f"zoo: error: --out {j / 'last'} is a checkpoint, not a run directory (give its run directory {j})\n"
    assert main(_args(j / "last" / "sub", "--resume", str(j / "last"), "--steps", "3")) == 2
    assert f"is inside the checkpoint directory {j / 'last'}" in capsys.readouterr().err
    assert sorted(p.name for p in (j / "last").iterdir()) == before


def test_a_resume_refuses_at_startup_a_checkpoint_it_could_not_save_over(tmp_path, monkeypatch, capsys):
    """A file of the user's in last/ (or a step_* the run will save) made the save fail at the end, also
    the save on Ctrl-C or SIGTERM, losing every step since: the run now refuses before its first step."""
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2")) == 0
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a: steps.append(1))
    for target in (out / "last" / "grid.png", out / "step_0000004" / "notes.txt"):
        target.parent.mkdir(exist_ok=True)
        target.write_text("mine")
        capsys.readouterr()
        assert main(_args(out, "--resume", str(out), "--steps", "4")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zoo: error: checkpoint directory {target.parent} ") and err.count("\n") == 1, err
        assert steps == [] and target.read_text() == "mine"
        if target.parent.name == "last":
            target.unlink()  # last/ whole again: the step directory is refused on its own


def test_a_run_without_last_is_still_a_run(tmp_path, capsys):
    """With last/ deleted, a new run there would have wiped the log and step directories; --resume points at them."""
    import shutil

    out = tmp_path / "run"
    assert main(_args(out, "--steps", "4")) == 0
    shutil.rmtree(out / "last")
    capsys.readouterr()
    assert main(_args(out, "--steps", "4")) == 2
    assert "already holds a run (step_0000004/)" in capsys.readouterr().err
    assert main(_args(out, "--resume", str(out), "--steps", "5")) == 0  # as --resume auto: its newest step
    assert (f"note: {out} has no last/: resuming from {out / 'step_0000004'}, its newest complete checkpoint"
            in capsys.readouterr().out)
    assert (out / "log.jsonl").is_file() and (out / "step_0000004").is_dir() and (out / "last").is_dir()


def test_a_truncated_last_is_saved_again_when_its_step_has_nothing_left_to_train(tmp_path, capsys):
    """The resume fell back to step_0000004, found nothing to train and said 'done; checkpoint .../last' with
    last/ still truncated: zoo sample of the run then refused it as incomplete."""
    from zoo.atomic import is_sealed
    from zoo.checkpoint import CONFIG

    out = tmp_path / "run"
    assert main(_args(out, "--steps", "4")) == 0
    with open(out / "last" / "ema.safetensors", "r+b") as f:
        f.truncate(1000)
    assert not is_sealed(out / "last", CONFIG)
    assert main(_args(out, "--resume", str(out), "--steps", "4")) == 0
    assert is_sealed(out / "last", CONFIG)
    assert main(["sample", str(out), "--n", "1", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0


def test_a_resume_from_the_newest_checkpoint_logs_at_once_and_keeps_what_it_logged_before_a_nan(tmp_path, capsys):
    """After a SIGKILL past last/ (records 5-6 in log.jsonl, last/ at step 4), the resumed run held its
    records back until its next save: a NaN at step 6 then lost the step-5 record that led up to it."""
    import json

    out, every = tmp_path / "run", ["--set", "train.log_every=1"]
    assert main(_args(out, "--steps", "4", *every)) == 0
    killed = [dict(json.loads(line), step=s) for s, line in zip((5, 6), (out / "log.jsonl").read_text().splitlines())]
    with open(out / "log.jsonl", "a") as f:  # what the killed process had logged past its last save
        f.writelines(json.dumps(r) + "\n" for r in killed)
    capsys.readouterr()
    assert main(_args(out, "--resume", "auto", "--steps", "8", *every, "--set", "train.lr=1e36",
                      "--set", "train.warmup_steps=0", "--set", "train.grad_clip=null")) == 1
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5] and logged[-1]["lr"] == 1e36


def test_a_run_without_last_resumes_from_the_step_saved_last_not_the_highest(tmp_path, capsys):
    """After a resume from an older step_*/, the higher step directories are the branch left behind: with
    last/ gone, --resume auto continued that old step_0000004 (and the hint named it) instead of step_0000003."""
    import shutil

    out = tmp_path / "run"
    assert main(_args(out, "--steps", "4")) == 0
    assert main(_args(out, "--resume", str(out / "step_0000002"), "--steps", "3")) == 0  # the branch: step 3
    assert (out / "step_0000004").is_dir() and (out / "step_0000003").is_dir()
    shutil.rmtree(out / "last")
    capsys.readouterr()
    assert main(_args(out, "--resume", "auto", "--steps", "5")) == 0
    assert f"resumed from {out / 'step_0000003'} at step 3" in capsys.readouterr().out


def test_resume_says_when_the_learning_rate_schedule_changes_and_tilde_paths_expand(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cosine = ["--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=0"]
    assert main(_args("~/run", "--set", "train.steps=4", *cosine)) == 0
    assert (tmp_path / "run" / "last").is_dir() and not (tmp_path / "~").exists()
    capsys.readouterr()
    assert main(_args("~/run", "--resume", "~/run", "--set", "train.steps=8", *cosine)) == 0
    out = capsys.readouterr().out
    assert "note: the learning rate at step 5 is" in out and "(train.steps 4 -> 8: the cosine schedule" in out
    # only what changed is named (it said 'train.steps 8 -> 8, lr 0.001 -> 0.001' when the warm-up had changed)
    assert main(_args("~/part", "--set", "train.steps=8", *cosine, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_args("~/part", "--resume", "~/part", "--set", "train.steps=8", "--set", "train.lr_schedule=cosine",
                      "--set", "train.warmup_steps=4", "--steps", "3")) == 0
    assert "(train.warmup_steps 0 -> 4: the cosine schedule" in capsys.readouterr().out
    assert main(_args("~/run", "--resume", "~/run", "--set", "train.steps=10", *cosine, "--steps", "9")) == 0
    assert "note: the learning rate" in capsys.readouterr().out  # 8 -> 10 changes it again
    assert main(_args("~/run", "--resume", "~/run", "--set", "train.steps=10", *cosine)) == 0
    assert "note: the learning rate" not in capsys.readouterr().out  # the same schedule: nothing to say


def test_repairing_a_directory_that_is_not_a_run_leaves_its_files(tmp_path, capsys):
    """--resume of a folder that is not a checkpoint: the error, and its notes.old-0123abcd still there."""
    folder = tmp_path / "mine"
    (folder / "notes.old-0123abcd").mkdir(parents=True)
    (folder / "notes.old-0123abcd" / "a.txt").write_text("hi")
    (folder / ".draft.txt.tmp-deadbeef").write_text("draft")
    assert main(_args(tmp_path / "out", "--resume", str(folder))) == 2
    assert "not a zoo checkpoint" in capsys.readouterr().err
    assert (folder / "notes.old-0123abcd" / "a.txt").read_text() == "hi" and (folder / ".draft.txt.tmp-deadbeef").exists()


def test_resume_accepts_a_recipe_that_means_the_same(tmp_path, capsys):
    """A default spelled out (model or diffusion), a component by name or as {type: NAME}, recomputation
    switched on: the same model and loss."""
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2")) == 0
    same = ["--set", "model.frequency_dim=256", "--set", "diffusion.objective={type: eps_mse}",
            "--set", "diffusion.prediction=eps", "--set", "diffusion.min_snr_gamma=null"]
    assert main(_args(out, "--resume", str(out), "--steps", "3", *same)) == 0
    capsys.readouterr()
    assert main(_args(out, "--resume", str(out), "--steps", "4", "--set", "model.frequency_dim=128")) == 2
    # step 3 spelled it out; another width of the time embedding is no resume, allowed or not
    assert "model.frequency_dim (256 there, 128 now) differs from the checkpoint's and changes the shapes" in \
        capsys.readouterr().err
    assert main(_args(out, "--resume", str(out), "--steps", "4", "--set", "diffusion.prediction=v")) == 2
    assert "diffusion.prediction differs from the checkpoint's" in capsys.readouterr().err


def test_resume_may_switch_recomputation():
    """model.grad_checkpointing (DiMR) / use_checkpoint (U-ViT) trade memory for time, pos_embed_init only starts a
    table the checkpoint replaces: the weights mean the same."""
    from zoo.training.rundir import check_resume_recipe

    stored = {"model": {"type": "dimr", "grad_checkpointing": [False, True]}, "diffusion": {"time_input": "dimr_log_snr"}}
    check_resume_recipe(stored, {**stored, "model": {"type": "dimr"}}, Path("ckpt"))
    check_resume_recipe({**stored, "model": {"type": "uvit", "use_checkpoint": True}}, {**stored, "model": {"type": "uvit"}},
                        Path("ckpt"))
    # how a learned position table starts: the checkpoint's table replaces it
    check_resume_recipe({**stored, "model": {"type": "uvit", "pos_embed_init": "sincos"}},
                        {**stored, "model": {"type": "uvit"}}, Path("ckpt"))
    with pytest.raises(zoo.errors.UserError, match="model.depth differs"):
        check_resume_recipe(stored, {**stored, "model": {"type": "dimr", "depth": 3}}, Path("ckpt"))


def test_resume_resolves_the_defaults_of_nested_components():
    """A block or norm default spelled out, or a norm by name against {type: NAME, eps: its default}."""
    from zoo.training.rundir import check_resume_recipe

    block = {"type": "transformer", "num_heads": 2, "norm": "td_rmsnorm"}
    stored = {"model": {"type": "dimr", "branches": [{"dim": 32, "block": block}]},
              "diffusion": {"schedule": {"type": "linear"}}}
    spelled = {"model": {"type": "dimr", "branches": [{"dim": 32, "block": {
        **block, "mlp_ratio": 4.0, "norm": {"type": "td_rmsnorm", "eps": 1e-8}}}]},
        "diffusion": {"schedule": {"type": "linear", "num_steps": 1000}}}
    check_resume_recipe(stored, spelled, Path("ckpt"))
    spelled["model"]["branches"][0]["block"]["norm"]["eps"] = 1e-6
    with pytest.raises(zoo.errors.UserError, match=r"model.branches.0.block.norm.eps differs"):
        check_resume_recipe(stored, spelled, Path("ckpt"))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_resume_with_nothing_left_to_train_names_what_goes_on(tmp_path, capsys, schedule):
    """'raise train.steps (or --steps) to go on' was said under a cosine decay too, where zoo train refuses a
    --steps past train.steps ('where the cosine decay ends'): --steps is named only where it works."""
    out = tmp_path / "run"
    args = lambda *extra: _args(out, "--set", f"train.lr_schedule={schedule}", "--set", "train.warmup_steps=0",
                                *extra)  # noqa: E731
    assert main(args("--set", "train.steps=4", "--steps", "2")) == 0
    capsys.readouterr()
    assert main(args("--set", "train.steps=4", "--resume", str(out), "--steps", "2")) == 0
    said = capsys.readouterr().out
    if schedule == "constant":
        assert "(stops at step 2); raise train.steps (--set train.steps=N) or --steps to go on\n" in said
    else:  # below train.steps, --steps still goes on
        assert ("(stops at step 2); --steps up to train.steps 4 goes on; past it, --set train.steps=N to go on (the "
                "cosine decay then stretches to step N)\n") in said
    assert main(args("--set", "train.steps=2", "--resume", str(out))) == 0
    said = capsys.readouterr().out
    if schedule == "constant":
        assert "nothing to train (stops at step 2); raise train.steps (--set train.steps=N) or --steps to go on" in said
        assert main(args("--set", "train.steps=2", "--resume", str(out), "--steps", "3")) == 0  # as said
    else:
        assert ("nothing to train (stops at step 2); --set train.steps=N to go on (the cosine decay then stretches to "
                "step N); --steps cannot pass train.steps 2, where the decay ends\n") in said
        assert main(args("--set", "train.steps=2", "--resume", str(out), "--steps", "3")) == 2  # as said
        assert main(args("--set", "train.steps=3", "--resume", str(out))) == 0
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 3


def test_small_messages_name_the_fix(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_args(out, "--resume", str(out), "--steps", "2")) == 0
    assert "note: already at step 2, nothing to train (stops at step 2)" in capsys.readouterr().out
    (tmp_path / "tab.yaml").write_text("model:\n\ttype: dit\n")
    assert main(["build", str(tmp_path / "tab.yaml")]) == 2
    assert "replace the tab on that line with spaces" in capsys.readouterr().err
    recipe = zoo.load_recipe(HERE / "tiny_train.yaml")
    ckpt.save_checkpoint(tmp_path / "converted", zoo.build_model(recipe), recipe)  # weights only, as zoo convert
    assert main(_args(tmp_path / "b", "--resume", str(tmp_path / "converted"))) == 2
    assert "converted or exported weights hold no optimizer state" in capsys.readouterr().err


def test_a_run_that_stopped_before_its_first_checkpoint_can_start_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--steps", "3")) == 1
    assert (out / "log.jsonl").exists() and not (out / "last").exists()
    (out / "step_0000001").mkdir()  # a folder of the user's own, named like a step: not a checkpoint
    assert main(_args(out, "--steps", "2")) == 0


def test_resuming_the_run_through_a_symlink_is_resuming_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2")) == 0
    (tmp_path / "latest").symlink_to(out / "last")
    assert main(_args(out, "--resume", str(tmp_path / "latest"), "--steps", "3")) == 0


def test_a_save_a_kill_interrupted_still_marks_the_directory_as_a_run(tmp_path, capsys):
    """A SIGKILL between sealing the first last.tmp-X and renaming it to last/ leaves a checkpoint
    under that name only; a new run there (no --resume) rolled it forward and then saved over it."""
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "1", "--set", "train.ckpt_every=0")) == 0
    (out / "last").rename(out / "last.tmp-deadbeef")
    capsys.readouterr()
    assert main(_args(out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run (last/ (a save a kill interrupted))" in err and f"--resume {out}" in err
    assert main(_args(out, "--resume", str(out), "--steps", "2")) == 0  # the resume rolls it forward
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 2


def test_a_dataset_smaller_than_the_batch_is_told_a_batch_size_that_is_accepted():
    """With 2 processes, 15 samples and batch 16 the hint said 'batch size <= 15', which the next
    run refused as not divisible by 2 processes."""
    from zoo.training.data import EpochSampler

    with pytest.raises(zoo.UserError, match=r"use train.batch_size=14 \(the largest multiple of 2, 2 processes x "
                       r"grad_accum 1, that fits\)"):
        EpochSampler.batches_per_epoch(15, 16, 2)
    with pytest.raises(zoo.UserError, match=r"use a batch size <= 15\)"):
        EpochSampler.batches_per_epoch(15, 16)
    with pytest.raises(zoo.UserError, match=r"use more data: 8 processes x grad_accum 1 = 8 micro-batches need at "
                       r"least 8 samples\)"):
        EpochSampler.batches_per_epoch(5, 16, 8)
    # one process accumulating 4 micro-batches was called "4 processes x grad_accum"
    with pytest.raises(zoo.UserError, match=r"use more data: 1 process x grad_accum 4 = 4 micro-batches need at least "
                       r"4 samples, or a smaller train.grad_accum\)"):
        EpochSampler.batches_per_epoch(3, 4, 1, 4)


def test_a_resume_without_out_continues_the_run_it_names_and_the_banner_comes_first(tmp_path, monkeypatch,
                                                                                       capsys):
    """`--resume RUN` alone forked into ./runs/<recipe> with only the new records, and 'resumed from'
    came before the line naming the run directory."""
    run = tmp_path / "run"
    assert main(_args(run, "--steps", "2")) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    argv = ["train", str(HERE / "tiny_train.yaml"), "--set", "train.sample_every=0", "--set", "train.ckpt_every=2"]
    assert main([*argv, "--resume", str(run / "step_0000002"), "--steps", "4"]) == 0
    assert not (tmp_path / "runs").exists()
    assert torch.load(run / "last" / "trainer_state.pt", weights_only=True)["step"] == 4
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"zoo train: run directory {run.resolve()}"
    assert out.index(f"zoo train: resumed from {run / 'step_0000002'} at step 2") > 3


def test_a_users_log_jsonl_or_loss_png_in_out_is_not_replaced(tmp_path, capsys):
    """zoo train into a folder holding a log.jsonl of the user's rewrote it with its own records."""
    import json as json_

    out = tmp_path / "mine"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 100, "note": "mine"}\n')
    assert main(_args(out, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds log.jsonl that zoo train did not write" in err and err.count("\n") == 1
    assert (out / "log.jsonl").read_text() == '{"step": 100, "note": "mine"}\n'
    (out / "log.jsonl").unlink()
    (out / "loss.png").write_bytes(b"my plot")
    assert main(_args(out, "--steps", "1")) == 2 and "holds loss.png that zoo train" in capsys.readouterr().err
    # a zoo run that stopped before its first checkpoint may start again over its own log
    (out / "loss.png").unlink()
    (out / "log.jsonl").write_text(json_.dumps({"step": 5, "loss": 0.5, "lr": 1e-3}) + "\n")
    assert main(_args(out, "--steps", "1")) == 0
    assert [json_.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_a_users_sample_grid_or_fd_reference_in_out_is_not_replaced(tmp_path, capsys):
    """samples/step_*.png and eval/fd_reference.npz of the user's were silently replaced by the run's."""
    from PIL import Image

    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out / "samples" / "step_0000002.png")
    mine = (out / "samples" / "step_0000002.png").read_bytes()
    assert main(_args(out, "--steps", "2", "--set", "train.sample_every=2")) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds samples/step_0000002.png that zoo train did not write" in err and err.count("\n") == 1
    assert (out / "samples" / "step_0000002.png").read_bytes() == mine
    (out / "samples" / "step_0000002.png").unlink()
    (out / "eval").mkdir()
    (out / "eval" / "fd_reference.npz").write_bytes(b"my statistics")
    assert main(_args(out, "--steps", "1")) == 2
    assert "holds eval/fd_reference.npz that zoo train" in capsys.readouterr().err
    # zoo's own grids (a run stopped before its first checkpoint, logging nothing) do not stop a new start
    (out / "eval" / "fd_reference.npz").unlink()
    assert main(_args(out, "--steps", "2", "--set", "train.sample_every=2", "--set", "train.log_every=0",
                      "--set", "train.ckpt_every=0")) == 0
    import shutil

    shutil.rmtree(out / "last")
    assert main(_args(out, "--steps", "2", "--set", "train.sample_every=2", "--set", "train.log_every=0")) == 0


def test_resume_auto_starts_a_run_and_continues_it(tmp_path, capsys):
    """One command line for the first start and every restart (torchrun --max-restarts, a requeued
    SLURM job): `--resume` alone could not start a run, and no --resume refused to restart one."""
    out = tmp_path / "run"
    argv = _args(out, "--resume", "auto")
    assert main([*argv, "--steps", "2"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert main([*argv, "--steps", "4"]) == 0
    assert f"resumed from {out / 'last'} at step 2" in capsys.readouterr().out
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 4


def test_a_refused_resume_of_a_live_run_touches_none_of_its_files(tmp_path, capsys):
    """The resume's checkpoint repair ran before the lock was asked for and deleted the live run's
    half-written .loss.png.tmp-X, whose rename then failed and ended that run."""
    from zoo.training.runlock import RunLock

    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2")) == 0
    writing = out / ".loss.png.tmp-0123abcd"  # what the live run's write_file has in flight
    writing.write_bytes(b"half a png")
    live = RunLock(out)
    live.acquire()
    try:
        capsys.readouterr()
        assert main(_args(out, "--resume", str(out), "--steps", "4")) == 2
        assert "another zoo train" in capsys.readouterr().err
        assert writing.read_bytes() == b"half a png"
    finally:
        live.release()


def test_a_run_dir_whose_file_system_cannot_lock_says_a_second_run_is_not_refused(tmp_path, capsys, monkeypatch):
    """Where flock fails (ENOLCK on some network mounts) the run goes on unlocked, as before, but it said
    nothing: two jobs of a cluster started into one --out both ran, replacing each other's checkpoints."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "1")) == 0
    said = capsys.readouterr().out
    assert (f"zoo train: warning: {out}'s file system does not lock files ({os.strerror(errno.ENOLCK)}): a second "
            "zoo train into it is not refused") in said
    assert not (out / ".zoo-train.lock").exists() and (out / "last").is_dir()


def test_resume_auto_continues_a_run_whose_last_is_gone_from_its_newest_step(tmp_path, capsys):
    """A kill between a step_* save and last/'s (or a deleted last/) stopped every requeue of
    `--resume auto` with 'has no last/ checkpoint'."""
    import shutil

    out = tmp_path / "run"
    assert main(_args(out, "--steps", "4")) == 0
    shutil.rmtree(out / "last")
    capsys.readouterr()
    assert main(_args(out, "--resume", "auto", "--steps", "6")) == 0
    assert f"resumed from {out / 'step_0000004'} at step 4" in capsys.readouterr().out
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("random_flip", [True, False])
def test_random_flip_mirrors_exactly_the_samples_whose_draw_says_so(tmp_path, random_flip):
    """data.random_flip: sample i reaches the objective mirrored iff its per-sample draw ``flip`` < 0.5."""
    from zoo.training.draws import draw

    recipe = zoo.load_recipe(HERE / "tiny_train.yaml", [*SMALL, "train.batch_size=8",
                                                         f"data.random_flip={str(random_flip).lower()}"])
    trainer = Trainer(recipe, tmp_path, log=QUIET)
    objective, seen = trainer.objective, []
    add_noise = objective.add_noise

    def recording(x0, t, noise):  # what the objective noises: the batch as the loop hands it over
        seen.append(x0.clone())
        return add_noise(x0, t, noise)

    objective.add_noise = recording
    x, y = next(trainer.batches)
    trainer.train_step(x, y)
    mirrored = draw(range(8), trainer.seed, trainer.shape, objective).flip < 0.5
    assert 0 < int(mirrored.sum()) < 8 and not torch.equal(x.flip(-1), x)  # both kinds, and a flip shows
    expected = torch.where(mirrored[:, None, None, None], x.flip(-1), x) if random_flip else x
    assert torch.equal(seen[0], expected)
