"""zoo.precision: the arithmetic of model calls while sampling (fp32, TF32, bf16/fp16 autocast)."""

from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.diffusion.guidance import GuidedModel
from zoo.precision import effective_precision, inference_precision
from zoo.sample import SampleRequest, sample_latents

TINY = str(Path(__file__).parent / "recipes" / "tiny_train.yaml")


def _nudged_model():
    recipe = zoo.load_recipe(TINY)
    torch.manual_seed(0)
    model = zoo.build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off DiT's zero init, so the output depends on the arithmetic
    return model, recipe


def test_autocast_runs_the_model_in_bf16_and_the_solver_gets_float32():
    lin = torch.nn.Linear(4, 4)
    with inference_precision("bf16", "cpu"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
        guided = GuidedModel(lambda x, t, y: lin(x), time_map=lambda t: t)
        assert guided(torch.randn(2, 4), torch.rand(2)).dtype == torch.float32
    assert lin(torch.randn(2, 4)).dtype == torch.float32  # only inside


@pytest.mark.parametrize("precision", [None, "fp32", "tf32"])
def test_fp32_and_tf32_on_a_cpu_are_the_process_default_bit_for_bit(precision):
    model, recipe = _nudged_model()
    reference, _ = sample_latents(model, recipe, SampleRequest(n=3, seed=1))
    x, _ = sample_latents(model, recipe, SampleRequest(n=3, seed=1, precision=precision))
    assert torch.equal(x, reference)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_samples_are_float32_and_close_to_fp32(precision):
    model, recipe = _nudged_model()
    reference, _ = sample_latents(model, recipe, SampleRequest(n=3, seed=1))
    x, _ = sample_latents(model, recipe, SampleRequest(n=3, seed=1, precision=precision))
    assert x.dtype == torch.float32 and not torch.equal(x, reference)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per op), fp16 11 (2^-12); the 5-step
    # DDIM chain of this 2-block model adds a few such errors per step but they do not grow (measured:
    # 1.5e-3 and 1.8e-4 of the sample scale): 1% bounds both with room for another CPU's kernels
    assert (x - reference).abs().max() <= 0.01 * reference.abs().max()


def test_the_recipe_sample_precision_is_used_and_a_flag_overrides_it():
    model, recipe = _nudged_model()
    reference, _ = sample_latents(model, recipe, SampleRequest(n=2, seed=1, precision="bf16"))
    recipe = zoo.load_recipe(TINY, ["sample.precision=bf16"])
    x, _ = sample_latents(model, recipe, SampleRequest(n=2, seed=1))
    assert torch.equal(x, reference)
    fp32, _ = sample_latents(model, recipe, SampleRequest(n=2, seed=1, precision="fp32"))
    assert not torch.equal(fp32, reference)


def test_tf32_switches_are_set_inside_and_restored_on_cuda_devices():
    """The switches are process-wide: sampling at fp32 inside zoo train (TF32 on by default) must not
    leave them off, nor tf32 leave them on. (They are plain flags: settable without a GPU.)"""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for before in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
            for precision, inside in (("fp32", False), ("tf32", True), (None, before)):
                with inference_precision(precision, "cuda"):
                    assert torch.backends.cuda.matmul.allow_tf32 is inside
                    assert torch.backends.cudnn.allow_tf32 is inside
                assert torch.backends.cuda.matmul.allow_tf32 is before and torch.backends.cudnn.allow_tf32 is before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_effective_precision_names_what_is_computed():
    assert effective_precision("tf32", "cpu") == "fp32" and effective_precision("tf32", "cuda") == "tf32"
    assert effective_precision(None, "cpu") == "fp32" and effective_precision(None, "cuda") is None
    assert effective_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        effective_precision("fp8", "cpu")


def test_a_misspelt_sample_precision_in_a_recipe_is_one_line(capsys):
    assert main(["build", TINY, "--set", "sample.precision=bf61"]) == 2
    err = capsys.readouterr().err
    assert "sample.precision" in err and "bf16" in err and "Traceback" not in err


def test_a_float64_model_samples_in_float64_whatever_the_recipe_says(tmp_path, capsys):
    """The DiT recipes sample with TF32, as DiT's sample.py does; a float64 parity run of them still works."""
    model, recipe = _nudged_model()
    recipe = zoo.load_recipe(TINY, ["sample.precision=bf16"])
    x, _ = sample_latents(model.double(), recipe, SampleRequest(n=2, seed=1))
    exact, _ = sample_latents(model.double(), zoo.load_recipe(TINY), SampleRequest(n=2, seed=1))
    assert x.dtype == torch.float64 and torch.equal(x, exact)
    assert zoo.load_recipe("dit_s_2")["sample"]["precision"] == "tf32"


def test_samples_are_keyed_by_what_the_process_switches_compute_on_cuda():
    """An eval on CUDA with no precision ran its convolutions in TF32 (PyTorch's cuDNN default) yet shared
    its samples with an exact --precision fp32 eval. (The switches are plain flags: no GPU needed.)"""
    from zoo.precision import arithmetic_key

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for m, c, unset in ((False, True, "tf32-convolutions"), (True, True, "tf32"), (False, False, None),
                            (True, False, "tf32-matmuls")):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c
            assert arithmetic_key(None, "cuda") == unset
            assert arithmetic_key("fp32", "cuda") is None and arithmetic_key("tf32", "cuda") == "tf32"
            assert arithmetic_key(None, "cpu") is None and arithmetic_key("bf16", "cpu") == "bf16"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
