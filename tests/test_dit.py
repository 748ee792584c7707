"""DiT and its parts: embeddings, adaLN-Zero, position tables, init, shapes, parameter counts."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

import zoo
from zoo.blocks.transformer import TransformerBlock
from zoo.backbones.common import PatchEmbed, sincos_pos_embed_2d, unpatchify
from zoo.backbones.dit import DiT
from zoo.conditioning.adaln_zero import AdaLNZero
from zoo.conditioning.base import Conditioning
from zoo.conditioning.embeddings import LabelEmbedder, TimestepEmbedder, timestep_sinusoid
from zoo.errors import UserError
from numerics import sinusoid_bound

GOLDEN = Path(__file__).parent / "golden" / "golden_dit_tiny.pt"
RECIPES = Path(zoo.__file__).resolve().parent.parent / "recipes"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def aux():
    return torch.load(GOLDEN, weights_only=True)["aux"]


def test_timestep_sinusoid_matches_official(aux):
    # Float32 sinusoids of arguments up to 999 differ between CPUs by up to u(6|t f| + 8) per
    # element (tests/numerics.py: exp's last ulp and the product's rounding move the argument);
    # this machine reproduces the golden bit for bit, another CPU measured 2.9e-5 at t = 999.
    t = aux["timestep_embedding_t"]
    assert ((timestep_sinusoid(t, 256) - aux["timestep_embedding_dim256"]).abs() <= sinusoid_bound(t, 256)).all()
    odd = timestep_sinusoid(t, 7)  # odd dim: [cos(3) | sin(3) | 0]
    assert odd.shape == (4, 7) and torch.equal(odd[:, -1], torch.zeros(4))
    assert ((odd - aux["timestep_embedding_dim7"]).abs() <= sinusoid_bound(t, 7)).all()
    assert sinusoid_bound(t, 256).max() < 4e-4  # the budget stays far below the features' size (1)


def test_timestep_sinusoid_is_float32_for_any_input_dtype():
    t = torch.tensor([0, 10, 999])
    ref = timestep_sinusoid(t, 16)
    assert ref.dtype == torch.float32
    assert torch.equal(ref[0], torch.cat([torch.ones(8), torch.zeros(8)]))  # cos first
    assert timestep_sinusoid(t.to(torch.bfloat16), 16).dtype == torch.float32
    assert torch.equal(timestep_sinusoid(t.double(), 16), ref)


def test_sincos_pos_tables_match_official(aux):
    # Made in float64 and rounded to float32: two CPUs' float64 sines (1 ulp apart at most) can
    # round to neighbouring float32 values at a tie, one float32 ulp (<= 2^-24 below 1) apart.
    torch.testing.assert_close(sincos_pos_embed_2d(64, 8), aux["sincos_pos_embed_D64_grid8"].float(), rtol=0, atol=2**-24)
    table = sincos_pos_embed_2d(16, 3, dtype=torch.float64)
    assert torch.allclose(table, aux["sincos_pos_embed_D16_grid3_float64"], atol=1e-12, rtol=0)
    # First half encodes the column: rows 0 and 3 (same column, next row) share it.
    assert torch.equal(table[0, :8], table[3, :8]) and not torch.equal(table[0, 8:], table[3, 8:])


def test_patch_embed_unpatchify_layout():
    x = torch.randn(2, 3, 8, 12)
    p = 4
    # A patch's features flattened (p1, p2, c) with c fastest, then unpatchify restores the image.
    tokens = x.reshape(2, 3, 2, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 3, (2, 3)), x)
    assert PatchEmbed(3, 16, p)(x).shape == (2, 6, 16)


def test_adaln_zero_modulates_and_starts_as_identity():
    # float64: the module fuses shift/scale with addcmul, whose rounding differs from the
    # reference expression; in double the difference (~1e-16 relative) is far below allclose's rtol.
    norm = AdaLNZero(8, cond_dim=5).double()
    x, emb = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    h, gate = norm(x, Conditioning(t=torch.zeros(2), emb=emb))
    assert torch.allclose(h, torch.nn.functional.layer_norm(x, (8,), eps=1e-6)) and torch.equal(gate, torch.zeros(2, 8))
    torch.nn.init.normal_(norm.linear.weight)
    shift, scale, gate_ref = norm.linear(torch.nn.functional.silu(emb)).chunk(3, -1)
    h, gate = norm(x, Conditioning(t=torch.zeros(2), emb=emb))
    ln = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.allclose(h, ln * (1 + scale[:, None]) + shift[:, None]) and torch.equal(gate, gate_ref)


def test_adaln_zero_on_feature_maps_and_without_gate():
    norm = AdaLNZero(6, cond_dim=4, gate=False).double()  # float64: see the test above
    assert norm.linear.out_features == 12
    torch.nn.init.normal_(norm.linear.weight)
    x, emb = torch.randn(2, 5, 5, 6, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    h, gate = norm(x, Conditioning(t=torch.zeros(2), emb=emb))
    shift, scale = norm.linear(torch.nn.functional.silu(emb)).chunk(2, -1)
    ln = torch.nn.functional.layer_norm(x, (6,), eps=1e-6)
    assert gate is None and torch.allclose(h, ln * (1 + scale[:, None, None]) + shift[:, None, None])


def test_label_embedder_dropout_and_null_row():
    emb = LabelEmbedder(10, 4, dropout_prob=0.5)
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.arange(10).repeat(100)
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table(labels))  # no dropout in eval
    forced = emb(torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(forced, emb.embedding_table(torch.tensor([10, 2])))
    emb.train()
    dropped = emb.drop_labels(labels)
    frac = (dropped == 10).float().mean().item()
    assert 0.4 < frac < 0.6 and torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert LabelEmbedder(10, 4, dropout_prob=0.0).embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="null class"):
        LabelEmbedder(10, 4, 0.0)(labels, force_drop_ids=torch.ones_like(labels))


def test_timestep_embedder_shapes():
    emb = TimestepEmbedder(32)
    assert emb.mlp[0].in_features == 256 and emb(torch.tensor([0, 999])).shape == (2, 32)


def test_fresh_dit_outputs_zero_and_has_right_shapes():
    model = DiT(**TINY)
    x, t, y = model.example_inputs(3)
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8) and torch.equal(out, torch.zeros_like(out))
    assert not model.pos_embed.requires_grad
    # Adaptive-LN weights are zero; attention/MLP weights are xavier (not zero).
    assert model.blocks[0].norm1.linear.weight.abs().sum() == 0 and model.blocks[0].attn.qkv.weight.abs().sum() > 0
    assert model(x, torch.tensor(5), None).shape == (3, 8, 8, 8)  # scalar t, unconditional


def test_dit_options_learn_sigma_and_no_null_row():
    model = DiT(**TINY, learn_sigma=False, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    torch.nn.init.normal_(model.final_layer.linear.weight)
    x, t, y = model.example_inputs(2)
    assert model(x, t, y).shape == (2, 4, 8, 8)
    with pytest.raises(UserError, match=r"this DiT has no null label \(class_dropout_prob 0\): pass labels y"):
        model(x, t, None)


def test_dit_forward_depends_on_t_and_y():
    model = DiT(**TINY)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    x, t, y = model.example_inputs(2)
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, t + 1, y)) and not torch.allclose(out, model(x, t, (y + 1) % 10))


def test_dit_with_other_conditioners():
    """A conditioner that needs no embedding still works: only the head's adaLN uses it."""
    from zoo.conditioning.layernorm import LayerNorm

    td_layernorm = zoo.get_component("conditioner", "td_layernorm")
    for norm in (partial(LayerNorm, eps=1e-6), partial(td_layernorm, time_scale=1 / 250)):
        model = DiT(**TINY, norm=norm)
        assert not any(isinstance(m, AdaLNZero) for m in model.blocks.modules())
        for p in model.final_layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x, t, y = model.example_inputs(2)
        out = model(x, t, y)
        assert out.shape == (2, 8, 8, 8) and not torch.allclose(out, model(x, t, (y + 1) % 10))
    with pytest.raises(UserError, match="on the DiT"):
        DiT(**TINY, block=partial(TransformerBlock, norm=AdaLNZero))
    with pytest.raises(UserError, match="time-token"):
        DiT(**TINY, norm=zoo.get_component("conditioner", "time_token"))
    with pytest.raises(UserError, match="not divisible"):
        DiT(**dict(TINY, input_size=9))


def _dit_params(depth: int, dim: int, patch: int, latent: int = 32, channels: int = 4, classes: int = 1000) -> int:
    """DiT's parameter count from the architecture facts of the official code, independent of the code."""
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * (4 * dim * dim) + 5 * dim + (6 * dim * dim + 6 * dim)
    embed = channels * patch * patch * dim + dim + (256 * dim + dim) + (dim * dim + dim) + (classes + 1) * dim
    pos = (latent // patch) ** 2 * dim
    head = (2 * dim * dim + 2 * dim) + dim * patch * patch * 2 * channels + patch * patch * 2 * channels
    return embed + pos + depth * block + head


PAPER_PARAMS = {  # the official implementations' counts
    "dit_xl_2": 675_129_632, "dit_xl_2_512": 676_014_368, "dit_l_2": 458_102_816,
    "dit_b_2": 130_512_416, "dit_s_2": 32_963_360, "dit_xl_4": 675_074_432,
}  # fmt: skip
SIZES = {"s": (12, 384), "b": (12, 768), "l": (24, 1024), "xl": (28, 1152)}


@pytest.mark.parametrize("name", [f"dit_{v}_{p}" for v in SIZES for p in (2, 4, 8)] + ["dit_xl_2_512"])
def test_recipe_param_counts_on_meta(name):
    with torch.device("meta"):
        model = zoo.build_model(RECIPES / f"{name}.yaml")
    n = sum(p.numel() for p in model.parameters())
    variant, patch = name.split("_")[1], int(name.split("_")[2])
    expected = _dit_params(*SIZES[variant], patch, latent=64 if name.endswith("512") else 32)
    assert n == expected
    if name in PAPER_PARAMS:
        assert n == PAPER_PARAMS[name]
    if name in ("dit_xl_2_512", "dit_s_8"):  # a meta forward costs ~1 ms per op: two suffice
        x, t, y = model.example_inputs(2)
        assert x.device.type == "meta" and model(x, t, y).shape == (2, 8, *x.shape[2:])


def test_recipe_carries_published_protocol():
    recipe = zoo.load_recipe(RECIPES / "dit_xl_2.yaml")
    assert recipe["train"]["lr"] == 1e-4 and recipe["train"]["batch_size"] == 256
    assert recipe["train"]["ema_decay"] == 0.9999 and recipe["train"]["weight_decay"] == 0.0
    assert recipe["diffusion"]["schedule"] == {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert recipe["sample"]["solver"] == {"type": "ddpm", "steps": 250, "variance": "learned"}  # learned sigma, as published
    assert recipe["sample"]["cfg"]["scale"] == 1.5 and recipe["data"]["vae_scale"] == 0.18215
