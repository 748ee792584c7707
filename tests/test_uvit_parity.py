"""U-ViT against the official implementation: golden files, the converter, every constructor option.

Options the golden files do not cover (``mlp_time_embed``, ``num_classes <= 0``, ``qkv_bias``,
odd depth, other patch sizes) are checked against :func:`reference_uvit`, a functional forward
over a state dict with the official key names written from the official layout. It is itself pinned to
the official outputs by the golden files first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from numerics import fixed_sinusoid, golden_features, sinusoid_bound

import zoo
from zoo.checkpoint import load_checkpoint
from zoo.cli import main as zoo_main
from zoo.convert import infer_family
from zoo.convert.uvit import convert_state_dict, official_config_to_model_spec
from zoo.errors import UserError
from zoo.parity import run_parity
from zoo.weights import load_state_dict_strict

GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_FILES = ["golden_uvit_tiny.pt", "golden_uvit_tiny_noconv.pt"]


def load(name: str) -> dict:
    return torch.load(GOLDEN / name, map_location="cpu", weights_only=True)


def generator_features(golden: dict) -> torch.Tensor:
    """The generating machine's float32 time features for the golden inputs (its ``aux`` table is
    for exactly these t). Ours may differ by up to ``sinusoid_bound`` on another CPU (1e-5 after
    propagation here); feeding the generator's leaves only the forward's own round-off."""
    aux = golden["aux"]
    features, delta = golden_features(aux["timestep_embedding_t"], aux["timestep_embedding_dimD"],
                                      golden["inputs"]["t"], golden["config"]["embed_dim"])  # fmt: skip
    assert not delta.any()
    return features


# -- an independent functional U-ViT over official key names ----------------------------------


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Official state-dict key -> shape for a ``UViT(**cfg)`` (the official layout)."""
    D, p, C = cfg["embed_dim"], cfg["patch_size"], cfg.get("in_chans", 3)
    hidden = int(D * cfg.get("mlp_ratio", 4))
    classes = cfg.get("num_classes", -1)
    tokens = (cfg["img_size"] // p) ** 2 + 1 + int(classes > 0)
    shapes = {"pos_embed": (1, tokens, D), "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,)}
    if classes > 0:
        shapes["label_emb.weight"] = (classes, D)
    if cfg.get("mlp_time_embed", False):
        shapes.update({"time_embed.0.weight": (4 * D, D), "time_embed.0.bias": (4 * D,),
                       "time_embed.2.weight": (D, 4 * D), "time_embed.2.bias": (D,)})  # fmt: skip
    half = cfg["depth"] // 2
    for name in [f"in_blocks.{i}" for i in range(half)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(half)]:
        shapes.update({f"{name}.norm1.weight": (D,), f"{name}.norm1.bias": (D,), f"{name}.attn.qkv.weight": (3 * D, D)})
        if cfg.get("qkv_bias", False):
            shapes[f"{name}.attn.qkv.bias"] = (3 * D,)
        shapes.update({f"{name}.attn.proj.weight": (D, D), f"{name}.attn.proj.bias": (D,),
                       f"{name}.norm2.weight": (D,), f"{name}.norm2.bias": (D,),
                       f"{name}.mlp.fc1.weight": (hidden, D), f"{name}.mlp.fc1.bias": (hidden,),
                       f"{name}.mlp.fc2.weight": (D, hidden), f"{name}.mlp.fc2.bias": (D,)})  # fmt: skip
        if name.startswith("out_blocks") and cfg.get("skip", True):
            shapes.update({f"{name}.skip_linear.weight": (D, 2 * D), f"{name}.skip_linear.bias": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,), "decoder_pred.weight": (p * p * C, D),
                   "decoder_pred.bias": (p * p * C,)})  # fmt: skip
    if cfg.get("conv", True):
        shapes.update({"final_layer.weight": (C, C, 3, 3), "final_layer.bias": (C,)})
    return shapes


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names (norm scales around 1, everything else N(0, 0.1²))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes(cfg).items():
        value = 0.1 * torch.randn(shape, generator=g)
        out[key] = value + 1 if ".norm" in key and key.endswith("weight") or key == "norm.weight" else value
    return out


def reference_uvit(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                   features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """U-ViT's forward written out with explicit (math) attention; ``features``: given time sinusoid."""
    D, p, heads = cfg["embed_dim"], cfg["patch_size"], cfg["num_heads"]
    B, C, H, W = x.shape
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if features is None:
        freqs = torch.exp(-math.log(10000) * torch.arange(D // 2, dtype=torch.float32) / (D // 2))
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    time = features.to(x.dtype)
    if cfg.get("mlp_time_embed", False):
        time = F.linear(F.silu(F.linear(time, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                        sd["time_embed.2.weight"], sd["time_embed.2.bias"])  # fmt: skip
    extra = [time[:, None]]
    if cfg.get("num_classes", -1) > 0:
        extra.insert(0, sd["label_emb.weight"][y][:, None])
    h = torch.cat([*extra, h], dim=1) + sd["pos_embed"]

    def block(name: str, h: torch.Tensor) -> torch.Tensor:
        a = F.layer_norm(h, (D,), sd[f"{name}.norm1.weight"], sd[f"{name}.norm1.bias"], 1e-5)
        qkv = F.linear(a, sd[f"{name}.attn.qkv.weight"], sd.get(f"{name}.attn.qkv.bias"))
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=heads)
        att = torch.softmax(q @ k.transpose(-1, -2) * (D // heads) ** -0.5, dim=-1) @ v  # (qk_scale: see below)
        att = rearrange(att, "b h l d -> b l (h d)")
        h = h + F.linear(att, sd[f"{name}.attn.proj.weight"], sd[f"{name}.attn.proj.bias"])
        m = F.layer_norm(h, (D,), sd[f"{name}.norm2.weight"], sd[f"{name}.norm2.bias"], 1e-5)
        m = F.gelu(F.linear(m, sd[f"{name}.mlp.fc1.weight"], sd[f"{name}.mlp.fc1.bias"]))
        return h + F.linear(m, sd[f"{name}.mlp.fc2.weight"], sd[f"{name}.mlp.fc2.bias"])

    skips = []
    for i in range(cfg["depth"] // 2):
        h = block(f"in_blocks.{i}", h)
        skips.append(h)
    h = block("mid_block", h)
    for i in range(cfg["depth"] // 2):
        if cfg.get("skip", True):
            h = F.linear(torch.cat([h, skips.pop()], dim=-1), sd[f"out_blocks.{i}.skip_linear.weight"],
                         sd[f"out_blocks.{i}.skip_linear.bias"])  # fmt: skip
        h = block(f"out_blocks.{i}", h)
    h = F.layer_norm(h, (D,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    h = F.linear(h, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, len(extra) :]
    out = rearrange(h, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=H // p, p1=p, p2=p)
    if cfg.get("conv", True):
        out = F.conv2d(out, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return out


def zoo_model(cfg: dict, official: dict) -> torch.nn.Module:
    model = zoo.build_model({"model": official_config_to_model_spec(cfg)})
    load_state_dict_strict(model, convert_state_dict(official, cfg))
    return model.eval()


# -- golden files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_fp32_and_fp64(name):
    golden = load(name)
    cfg, inputs = golden["config"], golden["inputs"]
    model = zoo_model(cfg, golden["state_dict"])
    with torch.no_grad(), fixed_sinusoid(generator_features(golden)):
        out = model(inputs["x"], inputs["t"], inputs["y"])
        # Each float32 forward is ~1.5e-6 from float64 (the golden's max_abs_diff_fp32_vs_fp64; ours
        # the same): 1e-5 leaves 3x margin for another CPU's accumulation order.
        assert (out - golden["outputs"]).abs().max() <= 1e-5
        model64 = model.double()
        out64 = model64(inputs["x"].double(), inputs["t"].double(), inputs["y"])
    assert out64.dtype == torch.float64 and (out64 - golden["outputs_fp64"]).abs().max() <= 1e-12


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_reference_matches_golden_so_it_can_judge_other_options(name):
    golden = load(name)
    shapes = {k: tuple(v.shape) for k, v in golden["state_dict"].items()}
    assert official_shapes(golden["config"]) == shapes
    inputs = golden["inputs"]
    out = reference_uvit(golden["state_dict"], golden["config"], inputs["x"], inputs["t"], inputs["y"],
                         generator_features(golden))  # fmt: skip
    assert (out - golden["outputs"]).abs().max() <= 1e-5  # float32 round-off, as in test_golden_fp32_and_fp64


def test_golden_time_embedding_is_our_sinusoid():
    from zoo.conditioning.embeddings import timestep_sinusoid

    aux = load("golden_uvit_tiny.pt")["aux"]
    t = aux["timestep_embedding_t"]  # up to 999: CPUs differ by up to u(6|t f| + 8), see tests/numerics.py
    assert ((timestep_sinusoid(t, 64) - aux["timestep_embedding_dimD"]).abs() <= sinusoid_bound(t, 64)).all()


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_parity_api_and_cli(name, capsys):
    with fixed_sinusoid(generator_features(load(name))):  # float32 round-off only, as above
        result = run_parity(GOLDEN / name, family="uvit")
        assert result.passed and result.max_abs <= 1e-5
        assert zoo_main(["parity", str(GOLDEN / name), "--family", "uvit"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "max abs error" in last and float(last.split()[3]) <= 1e-5
    assert run_parity(GOLDEN / name, family="uvit").passed  # our own sinusoid: within the 1e-4 contract
    assert infer_family(load(name)["config"]) == "uvit"  # from the config alone
    assert infer_family(load(name)["config"], hint="dit_baseline.pt") == "uvit"  # the config over the file name


# -- options beyond the golden config ----------------------------------------------------------

TINY = load("golden_uvit_tiny.pt")["config"]  # img 16, patch 2, 4 channels, D 64, depth 4, 2 heads, 11 classes


@pytest.mark.parametrize(
    "options",
    [
        {"mlp_time_embed": True},
        {"num_classes": 0},
        {"num_classes": -1, "conv": False},
        {"qkv_bias": True},
        {"depth": 5, "patch_size": 4, "in_chans": 3, "num_heads": 4, "mlp_ratio": 2},
        {"mlp_time_embed": True, "qkv_bias": True, "num_classes": -1, "depth": 3, "img_size": 8},
        {"skip": False},
        {"skip": False, "depth": 5},
        {"qk_scale": 0.5, "skip": True},  # the official attention's SDPA path (PyTorch 2) never applies it
    ],
    ids=["mlp_time_embed", "uncond0", "uncond-1_noconv", "qkv_bias", "odd_depth_p4", "all", "no_skips",
         "no_skips_depth5", "qk_scale"],
)
def test_options_convert_and_match_the_reference(options):
    cfg = {**TINY, **options}
    official = official_state_dict(cfg, seed=len(options))
    model = zoo_model(cfg, official)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g)
    t, y = torch.tensor([3.0, 777.25]), torch.tensor([2, 10])
    y = y if cfg["num_classes"] > 0 else None
    with torch.no_grad():
        out = model(x, t, y)
    assert (out - reference_uvit(official, cfg, x, t, y)).abs().max() <= 1e-5


def test_skip_false_maps_onto_the_backbone_and_qk_scale_is_dropped_as_the_official_model_runs():
    """Both were refused as unsupported: the official U-ViT's long-skip ablation, and a qk_scale that the
    official attention never applies under PyTorch 2 (an official model made with qk_scale=0.5 gives the
    outputs of the default scale: checked against the official code when this was written)."""
    assert official_config_to_model_spec({**TINY, "skip": False})["skip"] is False
    assert "skip" not in official_config_to_model_spec({**TINY, "skip": True})  # the default, left out
    assert official_config_to_model_spec({**TINY, "qk_scale": 0.5}) == official_config_to_model_spec(TINY)
    plain = zoo.build_model({"model": official_config_to_model_spec(TINY)})
    chained = zoo.build_model({"model": official_config_to_model_spec({**TINY, "skip": False})})
    d = TINY["embed_dim"]
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in chained.parameters()) == \
        (TINY["depth"] // 2) * (2 * d * d + d)  # the skip linears


def test_convert_command_writes_a_checkpoint_that_reproduces_golden(tmp_path, capsys):
    golden = load("golden_uvit_tiny.pt")
    torch.save({"ema": golden["state_dict"]}, tmp_path / "nnet_ema.pt")
    spec = official_config_to_model_spec(golden["config"])
    (tmp_path / "tiny.yaml").write_text(json.dumps({"model": spec}))  # JSON is YAML
    status = zoo_main(["convert", "uvit", str(tmp_path / "nnet_ema.pt"),
                       "--recipe", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "ckpt")])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    model, _ = load_checkpoint(tmp_path / "ckpt")
    inputs = golden["inputs"]
    with torch.no_grad(), fixed_sinusoid(generator_features(golden)):
        out = model.eval()(inputs["x"], inputs["t"], inputs["y"])
    assert (out - golden["outputs"]).abs().max() <= 1e-5  # float32 round-off, as in test_golden_fp32_and_fp64


# -- released checkpoints' key lists ------------------------------------------------------------

FULL_SIZE = {
    "uvit_m_4": dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
                     qkv_bias=False, mlp_time_embed=False, num_classes=1000, use_checkpoint=True),
    "uvit_h_2": dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4,
                     qkv_bias=False, mlp_time_embed=False, num_classes=1001, use_checkpoint=True, conv=False),
}  # fmt: skip  (the official imagenet64_uvit_mid / imagenet256_uvit_huge configs)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_released_key_lists_convert_into_strict_zoo_models(name):
    keys = json.loads((GOLDEN / "keys" / f"{name}.json").read_text())
    assert official_shapes(FULL_SIZE[name]) == {k: tuple(v) for k, v in keys.items()}
    official = {k: torch.empty(v, device="meta") for k, v in keys.items()}
    converted = convert_state_dict(official, FULL_SIZE[name])
    with torch.device("meta"):
        model = zoo.build_model({"model": official_config_to_model_spec(FULL_SIZE[name])})
        recipe = zoo.build_model(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert {k: tuple(v.shape) for k, v in recipe.state_dict().items()} == expected  # the recipe is this model
    model.load_state_dict(converted, strict=True, assign=True)


# -- converter errors ---------------------------------------------------------------------------


def test_converter_rejects_what_it_cannot_represent():
    with pytest.raises(UserError, match="unknown U-ViT config keys"):
        official_config_to_model_spec({**TINY, "embed_dims": 64})
    spec = official_config_to_model_spec({**TINY, "qk_scale": 32**-0.5, "name": "uvit"})
    assert spec["type"] == "uvit" and "skip" not in spec and "qk_scale" not in spec and "name" not in spec
    official = official_state_dict(TINY)
    with pytest.raises(UserError, match="unexpected key 'in_blocks.0.attn.q.weight'"):
        convert_state_dict({**official, "in_blocks.0.attn.q.weight": torch.zeros(1)})
    converted = convert_state_dict(official)
    assert converted["blocks.skip_linears.1.weight"] is official["out_blocks.1.skip_linear.weight"]
    assert converted["blocks.out_blocks.0.attn.qkv.weight"] is official["out_blocks.0.attn.qkv.weight"]
    assert len(converted) == len(official)


@pytest.mark.parametrize("official, recipe", [(-1, 0), (0, -1), (-1, -1)])
def test_an_unconditional_num_classes_matches_any_other_unconditional_one(official, recipe):
    """The official U-ViT is unconditional for num_classes <= 0 (its configs say -1), as zoo's is; a recipe's 0
    against a config's -1 was refused ('the recipe says 0, the official config -1')."""
    from zoo.convert import check_recipe_matches

    config = {**load("golden_uvit_tiny.pt")["config"], "num_classes": official}
    spec = official_config_to_model_spec(config)
    check_recipe_matches(spec, {**spec, "num_classes": recipe})
    with pytest.raises(UserError, match="the recipe says 10, the official config"):
        check_recipe_matches(spec, {**spec, "num_classes": 10})
