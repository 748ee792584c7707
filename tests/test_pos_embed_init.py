"""``pos_embed_init`` of U-ViT and DiMR: the released trunc-normal start, or a learned table that
starts from the 2-D sin-cos positions (what the emoji32 demo recipes use)."""

import pytest
import torch

import zoo
from zoo.backbones.common import sincos_pos_embed_2d
from zoo.errors import UserError

from test_dimr import tiny_spec

UVIT = {"type": "uvit", "img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2,
        "num_heads": 2, "num_classes": 5}  # fmt: skip


def build(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build_model({"model": spec})


def test_dimr_sincos_starts_every_branch_from_its_own_table_and_keeps_learning_it():
    model = build(tiny_spec(pos_embed_init="sincos"))
    for branch in model.branches:
        dim = branch.pos_embed.shape[-1]
        expected = sincos_pos_embed_2d(dim, branch.grid).reshape(branch.pos_embed.shape)
        assert torch.equal(branch.pos_embed.detach(), expected), f"grid {branch.grid}"
        assert branch.pos_embed.requires_grad
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.5, -1.0]), torch.tensor([1, 2])
    model(x, t, y)[-1].square().mean().backward()
    assert all(b.pos_embed.grad is not None and b.pos_embed.grad.abs().sum() > 0 for b in model.branches)


def test_uvit_sincos_covers_the_patches_and_leaves_the_extra_tokens_trunc_normal():
    model = build({**UVIT, "pos_embed_init": "sincos"})
    extra = model.num_extra_tokens
    assert extra == 2  # time and label tokens
    table = model.pos_embed.detach()[0]
    assert torch.equal(table[extra:], sincos_pos_embed_2d(32, 4))
    # trunc-normal(0.02) cuts at +-2 (absolute), so the extra rows are small but not zero
    assert 0 < table[:extra].abs().max() <= 2.0 and table[:extra].std() < 0.05


@pytest.mark.parametrize("spec", [tiny_spec(), UVIT], ids=["dimr", "uvit"])
def test_normal_is_the_default_released_init(spec):
    model = build(spec)
    tables = [b.pos_embed for b in model.branches] if hasattr(model, "branches") else [model.pos_embed]
    for table in tables:
        assert 0.01 < table.std() < 0.03 and table.abs().max() <= 2.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**UVIT, "embed_dim": 30, "num_heads": 3, "pos_embed_init": "sincos"}, "divisible by 4, got 30"),
        ({**UVIT, "pos_embed_init": "fourier"}, "one of normal, sincos"),
        (tiny_spec(pos_embed_init="sin"), "did you mean sincos"),
    ],
    ids=["width", "uvit-unknown", "dimr-unknown"],
)
def test_bad_pos_embed_init_is_a_user_error(spec, message):
    with pytest.raises(UserError, match=message):
        build(spec)


def test_a_sincos_width_error_points_at_the_recipe_line_of_pos_embed_init(tmp_path):
    """It pointed at the model section's first line (key model), not at the setting to change."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {**UVIT, "embed_dim": 30, "num_heads": 3, "pos_embed_init": "sincos"}},
                                     sort_keys=False))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "pos_embed_init" in text)
    with pytest.raises(UserError) as err:
        zoo.build_model(recipe)
    assert (err.value.key_path, err.value.file, err.value.line) == ("model.pos_embed_init", str(recipe), line)
