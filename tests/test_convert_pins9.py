"""Pins on the official-checkpoint converters (``zoo.convert`` and its DiT / U-ViT / DiMR families) that mutation
testing found unheld: the family a state dict is taken for, list settings of unequal length, and DiMR config
defaults and checks, U-ViT configs zoo cannot build (see each test). Tiny configs and tensors only."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_state_dict_with_two_families_signatures_names_no_family():
    """``guess_family`` names a family only when exactly one family's signature key is present: one that took the
    first match called a mixed file DiT and refused a U-ViT conversion with the wrong "holds dit weights"."""
    from zoo.convert import guess_family

    w = torch.zeros(1)
    assert guess_family({"x_embedder.proj.weight": w}) == "dit"
    assert guess_family({"mid_block.norm1.weight": w}) == "uvit"
    assert guess_family({"stages.0.input_layer.1.weight": w}) == "dimr"
    assert guess_family({"x_embedder.proj.weight": w, "mid_block.norm1.weight": w}) is None
    assert guess_family({"other": w}) is None

# The official constructor kwargs of tests/golden/golden_dimr_tiny_r3.pt: three stages, transformer then ConvNeXt.
DIMR_CONFIG = {
    "channels": 3, "num_classes": 11, "block_grad_to_lowres": False, "norm_type": "TDRMSN", "stage_configs": [
        {"block_type": "TransformerBlock", "dim": 32, "hidden_dim": 64, "num_attention_heads": 2, "num_blocks": 4,
         "max_height": 8, "max_width": 8, "image_input_ratio": 2, "input_feature_ratio": 2, "final_kernel_size": 3,
         "dropout_prob": 0},
        {"block_type": "ConvNeXtBlock", "dim": 16, "hidden_dim": 32, "kernel_size": 7, "num_blocks": 2,
         "max_height": 16, "max_width": 16, "image_input_ratio": 1, "input_feature_ratio": 2, "final_kernel_size": 3,
         "dropout_prob": 0},
        {"block_type": "ConvNeXtBlock", "dim": 8, "hidden_dim": 16, "kernel_size": 7, "num_blocks": 3,
         "max_height": 32, "max_width": 32, "image_input_ratio": 1, "input_feature_ratio": 1, "final_kernel_size": 3,
         "dropout_prob": 0},
    ]}  # fmt: skip


def test_a_recipe_with_fewer_branches_than_the_official_config_is_refused():
    """A list setting must have as many entries on both sides: a check that only refused a longer recipe let a
    2-branch recipe pass against a 3-stage official config, comparing the first two and dropping the third."""
    from zoo.convert import check_recipe_matches
    from zoo.convert.dimr import official_config_to_model_spec

    spec = official_config_to_model_spec(DIMR_CONFIG)
    check_recipe_matches(spec, spec)
    fewer = {**spec, "branches": spec["branches"][:2]}
    with pytest.raises(UserError, match="the recipe's model.branches has 2 entries, the official config 3"):
        check_recipe_matches(spec, fewer)
    with pytest.raises(UserError, match="has 3 entries, the official config 2"):
        check_recipe_matches(fewer, spec)


def _stage0(**changes) -> dict:
    return {**DIMR_CONFIG, "stage_configs": [{**DIMR_CONFIG["stage_configs"][0], **changes}]}


def test_a_dimr_hidden_dim_that_is_a_multiple_of_half_the_dim_is_accepted():
    """GeGLU's hidden_dim needs only be a multiple of dim/2 (mlp_ratio 1.5 is fine): a check that asked for a multiple
    of dim refused such a config; one not a multiple of dim/2 is still refused."""
    from zoo.convert.dimr import official_config_to_model_spec

    spec = official_config_to_model_spec(_stage0(hidden_dim=48))
    assert spec["branches"][0]["block"]["mlp_ratio"] == 1.5
    with pytest.raises(UserError, match="hidden_dim 40 is not a multiple of dim/2"):
        official_config_to_model_spec(_stage0(hidden_dim=40))


def test_a_dimr_config_without_block_grad_to_lowres_does_not_detach():
    """An official config that leaves ``block_grad_to_lowres`` out converts to ``detach_handed: false``: a default
    of True made the converted model (and the config comparison) stop gradients the config never asked to stop."""
    from zoo.convert.dimr import official_config_to_model_spec

    config = {k: v for k, v in DIMR_CONFIG.items() if k != "block_grad_to_lowres"}
    assert official_config_to_model_spec(config)["detach_handed"] is False
    assert official_config_to_model_spec({**config, "block_grad_to_lowres": True})["detach_handed"] is True


def test_a_dimr_stage_without_final_kernel_size_gets_a_3x3_head():
    """A stage config that names no ``final_kernel_size`` converts with the official 3x3 output kernel: another
    default built a head whose weights the checkpoint's 3x3 ones do not fit."""
    from zoo.convert.dimr import official_config_to_model_spec

    stage = {k: v for k, v in DIMR_CONFIG["stage_configs"][0].items() if k != "final_kernel_size"}
    spec = official_config_to_model_spec({**DIMR_CONFIG, "stage_configs": [stage]})
    assert spec["branches"][0]["head_kernel_size"] == 3
    assert official_config_to_model_spec(_stage0(final_kernel_size=1))["branches"][0]["head_kernel_size"] == 1


UVIT_CONFIG = {"img_size": 8, "patch_size": 2, "in_chans": 3, "embed_dim": 16, "depth": 3, "num_heads": 2,
               "mlp_ratio": 2, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 5}


def test_uvit_configs_zoo_cannot_build_are_refused():
    """The text-to-image U-ViT (``name`` other than ``uvit``) and a norm other than LayerNorm are refused: without
    the checks they were dropped, and a model with other layers was built and loaded under the same key names."""
    from zoo.convert.uvit import official_config_to_model_spec

    assert official_config_to_model_spec({**UVIT_CONFIG, "name": "uvit", "norm_layer": "LayerNorm"})["type"] == "uvit"
    with pytest.raises(UserError, match="text-to-image U-ViT is not supported"):
        official_config_to_model_spec({**UVIT_CONFIG, "name": "uvit_t2i"})
    with pytest.raises(UserError, match="norm_layer='RMSNorm' is not supported"):
        official_config_to_model_spec({**UVIT_CONFIG, "norm_layer": "RMSNorm"})
