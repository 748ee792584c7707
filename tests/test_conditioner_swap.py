"""Conditioners are swappable: any block takes any conditioner, and so does every DiMR branch."""

from pathlib import Path

import pytest
import torch

import zoo
from zoo.blocks.convnext import ConvNeXtBlock
from zoo.blocks.mlp import GeGluMlp
from zoo.blocks.transformer import TransformerBlock
from zoo.conditioning.adaln_zero import AdaLNZero
from zoo.conditioning.base import Conditioning
from zoo.conditioning.time_dependent import TimeDependentLayerNorm
from zoo.domains import Divisible

RECIPES = Path(__file__).parents[1] / "recipes"
TEST_RECIPES = Path(__file__).parent / "recipes"


def _perturb(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_convnext_block_with_adaln_zero():
    block = ConvNeXtBlock(8, cond_dim=12, mlp_ratio=2.0, norm=AdaLNZero, mlp=GeGluMlp)
    x = torch.randn(2, 5, 5, 8)
    cond = Conditioning(t=torch.tensor([1.0, 2.0]), emb=torch.randn(2, 12))
    # zero-initialised modulation: the gate is 0, only DiMR's unconditioned conv residual acts
    torch.testing.assert_close(block(x, cond), x + block.depthwise(x), rtol=0, atol=0)
    _perturb(block)
    h = x + block.depthwise(x)
    shift, scale, gate = block.norm.linear(torch.nn.functional.silu(cond.emb)).chunk(3, dim=-1)
    u = torch.nn.functional.layer_norm(h, (8,), eps=1e-6) * (1 + scale[:, None, None]) + shift[:, None, None]
    torch.testing.assert_close(block(x, cond), h + gate[:, None, None] * block.mlp(u), rtol=0, atol=1e-5)
    other = Conditioning(t=cond.t, emb=torch.randn(2, 12))
    assert not torch.allclose(block(x, cond), block(x, other))


def test_transformer_block_with_td_layernorm():
    block = TransformerBlock(16, num_heads=2, norm=TimeDependentLayerNorm)
    _perturb(block)
    x = torch.randn(2, 7, 16)
    early, late = Conditioning(t=torch.tensor([-4.0, -4.0])), Conditioning(t=torch.tensor([4.0, 4.0]))
    h = x + block.attn(block.norm1(x, early)[0])
    torch.testing.assert_close(block(x, early), h + block.mlp(block.norm2(h, early)[0]), rtol=0, atol=1e-5)
    assert not torch.allclose(block(x, early), block(x, late))


def _tiny(block_norm: str, **model) -> torch.nn.Module:
    convnext = {"type": "convnext", "variant": "dimr", "mlp_ratio": 2.0, "norm": block_norm, "mlp": "geglu_mlp"}
    transformer = {"type": "transformer", "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": False, "norm": block_norm,
                   "mlp": "geglu_mlp"}  # fmt: skip
    spec = {"type": "dimr", "in_channels": 3, "input_size": 8, "num_classes": 5, **model,
            "branches": [{"dim": 16, "depth": 1, "patch_size": 2, "block": transformer},
                         {"dim": 8, "depth": 2, "patch_size": 1, "block": convnext}]}  # fmt: skip
    torch.manual_seed(0)
    return zoo.build_model({"model": spec})


def test_dimr_with_adaln_zero_blocks_builds_runs_and_keeps_zero_init():
    model = _tiny("adaln_zero", norm="layernorm", class_embedding=True)
    assert all(branch.needs_embedding and branch.y_embedder is not None for branch in model.branches)
    modulations = [m.linear.weight for m in model.modules() if isinstance(m, AdaLNZero)]
    assert len(modulations) == 2 * 1 + 3  # one Transformer block (two norms), three ConvNeXt blocks
    assert all(torch.count_nonzero(w) == 0 for w in modulations)  # DiMR's trunc-normal init kept adaLN's zeros
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([-2.0, 1.0]), torch.tensor([0, 4])
    outputs = model(x, t, y)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 4, 4), (2, 3, 8, 8)]
    _perturb(model)
    assert not torch.allclose(model(x, t, y)[-1], model(x, t + 1, y)[-1])  # time enters through the embedding


def test_dimr_with_the_paper_td_layernorm_in_the_blocks():
    model = _tiny("td_layernorm_paper")
    _perturb(model)
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([2])
    assert not torch.allclose(model(x, torch.tensor([-3.0]), y)[-1], model(x, torch.tensor([3.0]), y)[-1])


def test_swap_is_a_one_line_recipe_change():
    with torch.device("meta"):
        base = zoo.build_model(RECIPES / "dimr_m_3r.yaml")
        swapped = zoo.build_model(RECIPES / "dimr_m_3r.yaml", ["model.branches.2.block.norm=adaln_zero"])
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    C, blocks = 192, 9
    td_rms, adaln = 4 * C, 3 * C * C + 3 * C
    timestep_mlp = 256 * C + C + C * C + C
    assert params(swapped) - params(base) == blocks * (adaln - td_rms) + timestep_mlp
    outputs = swapped(*swapped.example_inputs(2))
    assert tuple(outputs[-1].shape) == (2, 3, 64, 64)


def test_a_model_whose_norms_all_ignore_time_is_refused():
    """U-ViT with plain LayerNorm and no time token, or a DiMR with plain norms everywhere, built and
    predicted the same at every noise level. One branch with a time-dependent norm is enough."""
    import pytest

    tiny_dimr = Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml"
    plain = ["model.norm=layernorm", "model.branches.0.block.norm=layernorm"]
    with pytest.raises(zoo.UserError, match="no layer of the DiMR sees the time t"):
        zoo.build_model(zoo.load_recipe(tiny_dimr, [*plain, "model.branches.1.block.norm=rmsnorm"]))
    model = zoo.build_model(zoo.load_recipe(tiny_dimr, plain)).eval()  # branch 1 keeps td_rmsnorm
    _perturb(model)
    x, t, y = model.example_inputs(2)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y)[-1], model(x, t + 1.0, y)[-1])
    with pytest.raises(zoo.UserError, match="no layer of the U-ViT sees the time t") as err:
        zoo.build_model(RECIPES / "emoji32" / "uvit.yaml", ["model.norm=layernorm"])
    assert str(err.value).startswith("--set model.norm=layernorm: key model.norm: ")  # it said "key model"
    with pytest.raises(zoo.UserError) as err:
        zoo.build_model("dit_s_2", ["model.norm=time_token"])
    assert str(err.value).startswith("--set model.norm=time_token: key model.norm: DiT conditions through its norms")


class _BareTensorNorm(torch.nn.Module):
    """A plugin conditioner that breaks the contract: returns ``h`` alone, not ``(h, gate)``."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.norm(x)


def test_a_conditioner_returning_a_bare_tensor_is_named_not_unpacked():
    """At batch 2 ``h, gate = norm(x, cond)`` unpacked the tensor's batch dimension into h and gate
    and ran on with both wrong; at any other batch it was 'too many values to unpack'."""
    import pytest

    cond = Conditioning(t=torch.tensor([1.0, 2.0]))
    blocks = [(TransformerBlock(8, 2, norm=_BareTensorNorm), torch.randn(2, 5, 8)),
              (ConvNeXtBlock(8, norm=_BareTensorNorm), torch.randn(2, 3, 3, 8))]
    for block, x in blocks:
        with pytest.raises(TypeError, match=r"conditioner _BareTensorNorm \(.*\) returned Tensor; .* must return \(h, gate\)"):
            block(x, cond)
    dit = zoo.build_model({"type": "dit", "input_size": 4, "patch_size": 2, "in_channels": 3, "hidden_size": 8,
                           "depth": 1, "num_heads": 2, "num_classes": 4, "norm": {"_target_": f"{__name__}._BareTensorNorm"}})
    with pytest.raises(zoo.UserError, match="conditioner _BareTensorNorm") as info:  # the CLI: one line, exit 2
        dit(*dit.example_inputs(2))
    assert isinstance(info.value, TypeError) and "return (h, None)" in str(info.value)


@pytest.mark.parametrize("spec, norms", [
    ({"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 1,
      "num_heads": 2, "num_classes": 5}, ("norm",)),
    ({"type": "uvit", "img_size": 8, "patch_size": 2, "in_chans": 3, "embed_dim": 32, "depth": 1, "num_heads": 2},
     ("norm", "head_norm")),
])
@pytest.mark.parametrize("conditioner", ["td_layernorm", "td_rmsnorm", "td_layernorm_paper"])
def test_time_dependent_norms_follow_the_whole_chain_in_backbones_fed_the_ddpm_step(spec, norms, conditioner):
    """DiT and U-ViT take t in 0..999; with DiMR's time_scale 0.25 (made for log_snr in [-4, 4]) the
    gate sigma(t/4) was 1 to float precision from t ~ 50 on: the norm gave the same output at t = 100
    and t = 900, and its w, b got no gradient. A time_scale the recipe sets is kept; DiMR keeps 0.25."""
    from zoo.conditioning.time_dependent import STEP_TIME_SCALE, _TimeDependentNorm

    model = zoo.build_model({**spec, **{key: conditioner for key in norms}})
    found = [m for m in model.modules() if isinstance(m, _TimeDependentNorm)]
    assert found and all(m.time_scale == STEP_TIME_SCALE for m in found)
    norm = found[0]
    with torch.no_grad():
        norm.weight.p0.fill_(2.0), norm.weight.p1.fill_(0.5)
    x = torch.randn(2, 5, 32)
    early, late = (norm(x, Conditioning(t=torch.full((2,), t)))[0] for t in (100.0, 900.0))
    assert (early - late).abs().max() > 0.1
    kept = zoo.build_model({**spec, norms[0]: {"type": conditioner, "time_scale": 0.25}})
    assert {m.time_scale for m in kept.modules() if isinstance(m, _TimeDependentNorm) and m in
            set(kept.blocks.modules())} == {0.25}
    assert {m.time_scale for m in _tiny("td_rmsnorm").modules() if isinstance(m, _TimeDependentNorm)} == {0.25}


def test_adaln_zero_without_an_embedding_of_its_width_says_what_it_reads():
    """In a model of one's own: no emb was a bare ValueError without the fix, and an emb of another
    width "mat1 and mat2 shapes cannot be multiplied (2x32 and 16x96)" from the modulation Linear."""
    from zoo.errors import UserError

    block = TransformerBlock(32, num_heads=2, norm=AdaLNZero, cond_dim=16)
    x, t = torch.randn(2, 5, 32), torch.tensor([1.0, 2.0])
    with pytest.raises(UserError, match=r"AdaLNZero\(dim=32\) reads a \(B, 16\) .* got none .*cond_dim"):
        block(x, Conditioning(t=t))
    with pytest.raises(UserError, match=r"reads a \(B, 16\) .* got one of shape \(2, 32\)"):
        block(x, Conditioning(t=t, emb=torch.randn(2, 32)))
    assert block(x, Conditioning(t=t, emb=torch.randn(2, 16))).shape == x.shape


class _PlainTimeNorm(torch.nn.Module):
    """A plugin conditioner as README describes one (``norm(dim, cond_dim=...)`` returning ``(h, gate)``),
    reading ``cond.t`` and declaring none of zoo's class attributes."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.slope = torch.nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, None]:
        t = torch.as_tensor(cond.t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.norm(x) * (1 + self.slope * t), None


def test_a_plugin_conditioner_that_reads_time_is_not_refused_as_time_blind():
    """U-ViT with such a conditioner, or a DiMR with it in every branch, was refused with "no layer of the
    U-ViT sees the time t": only classes declaring needs_embedding counted as conditioners."""
    zoo.register("conditioner", "plain_time_norm")(_PlainTimeNorm)
    try:
        uvit = zoo.build_model({"type": "uvit", "img_size": 8, "patch_size": 2, "in_chans": 3, "embed_dim": 32,
                                "depth": 1, "num_heads": 2, "norm": "plain_time_norm"}).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert not torch.allclose(uvit(x, torch.full((2,), 100.0)), uvit(x, torch.full((2,), 900.0)))
        dimr = _tiny("plain_time_norm", norm="layernorm")
        assert any(isinstance(m, _PlainTimeNorm) for m in dimr.modules())
        with pytest.raises(zoo.UserError, match="no layer of the DiMR sees the time t"):
            _tiny("layernorm", norm="layernorm")
    finally:
        zoo.registry.unregister("conditioner", "plain_time_norm")


class _GroupTimeNorm(_PlainTimeNorm):
    """A plugin GroupNorm conditioner declaring its rule on the width its block gives it."""

    constraints = (Divisible("dim", "groups"),)

    def __init__(self, dim: int, groups: int = 4, cond_dim: int | None = None):
        super().__init__(dim, cond_dim)
        self.groups = groups


def test_a_plugin_conditioners_rule_on_a_width_its_block_gives_is_checked_when_built(capsys):
    """The recipe's check skips a rule whose field the parent supplies (dim): groups 5 on a width of 32 built
    silently here (a GroupNorm's own ValueError, where it had one, came out as a traceback, exit 1)."""
    from zoo.cli import main

    zoo.register("conditioner", "group_time_norm")(_GroupTimeNorm)
    try:
        model = zoo.build_model(zoo.load_recipe(TEST_RECIPES / "tiny_train.yaml", ["model.norm={type: group_time_norm, groups: 8}"]))
        assert {m.groups for m in model.modules() if isinstance(m, _GroupTimeNorm)} == {8}
        args = ["build", str(TEST_RECIPES / "tiny_train.yaml"), "--set", "model.norm={type: group_time_norm, groups: 5}"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "key model.norm: dim=32 must be divisible by groups=5 (dim set by the " \
            "component that builds this one)" in err
    finally:
        zoo.registry.unregister("conditioner", "group_time_norm")


@pytest.mark.parametrize("norm", ["time_token", "td_layernorm"])
def test_a_uvit_head_norm_that_embeds_the_label_keeps_the_label_token_in_the_blocks(norm):
    """head_norm adaln_zero alone (blocks on the time token or TD-LN) took the label token out of the
    sequence: the label then reached only the last norm's shift and scale, without a word."""
    spec = {"type": "uvit", "img_size": 8, "patch_size": 2, "in_chans": 3, "embed_dim": 32, "depth": 2,
            "num_heads": 2, "num_classes": 5, "norm": norm}
    plain, embedding_head = (zoo.build_model({**spec, "head_norm": head}) for head in ("layernorm", "adaln_zero"))
    assert embedding_head.label_token and embedding_head.num_extra_tokens == plain.num_extra_tokens
    assert embedding_head.pos_embed.shape == plain.pos_embed.shape
    x, t, _ = embedding_head.example_inputs(2)
    seen = {}
    embedding_head.blocks.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault(len(seen), o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        embedding_head(x, t, torch.tensor([0, 0])), embedding_head(x, t, torch.tensor([3, 3]))
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # the label changes what the blocks compute


def test_a_block_given_a_bare_time_tensor_as_cond_names_conditioning():
    """A block used on its own with cond=t: a time-dependent norm read t.t (the transpose method) and raised
    'Could not infer dtype of builtin_function_or_method'; adaLN-Zero raised an AttributeError on .emb."""
    from zoo.errors import ContractError

    for norm in ("td_layernorm", "adaln_zero", "layernorm"):
        block = zoo.build_component("block", {"type": "transformer", "num_heads": 4, "norm": norm}, dim=32, cond_dim=32)
        with pytest.raises(ContractError, match=r"^a block's cond must be a Conditioning, got Tensor"):
            block(torch.randn(2, 5, 32), torch.rand(2))


@pytest.mark.parametrize("name, who", [("td_layernorm", "TimeDependentLayerNorm"), ("td_rmsnorm", "TimeDependentRMSNorm"),
                                       ("td_layernorm_paper", None), ("adaln_zero", "AdaLNZero")])
def test_a_conditioner_given_a_bare_time_tensor_as_cond_names_conditioning(name, who):
    """A conditioner used on its own with cond=t (no block around it to check): the time-dependent norms
    read t.t, the transpose method ('Could not infer dtype of builtin_function_or_method'), adaLN-Zero
    raised "'Tensor' object has no attribute 'emb'"."""
    from zoo.errors import ContractError

    norm = zoo.build_component("conditioner", name, dim=8, cond_dim=8)
    who = who or type(norm).__name__
    with pytest.raises(ContractError, match=rf"^{who}'s cond must be a Conditioning, got Tensor"):
        norm(torch.randn(2, 5, 8), torch.tensor([0.1, 0.2]))
    h, _ = norm(torch.randn(2, 5, 8), Conditioning(t=torch.tensor([0.1, 0.2]), emb=torch.randn(2, 8)))
    assert h.shape == (2, 5, 8)


@pytest.mark.parametrize("norm, reads", [("td_layernorm", r"reads the time from Conditioning\.t"),
                                         ("td_rmsnorm", r"reads the time from Conditioning\.t"),
                                         ("adaln_zero", r"Conditioning\.emb is None")])
def test_a_block_given_no_cond_or_no_time_says_what_its_conditioner_reads(norm, reads):
    """A block used on its own with cond=None: the time-dependent norms raised "'NoneType' object has no
    attribute 't'", adaLN-Zero the same for 'emb'."""
    from zoo.errors import UserError

    block = zoo.build_component("block", {"type": "transformer", "num_heads": 4, "norm": norm}, dim=32, cond_dim=32)
    for cond in (None, Conditioning(t=None)):
        with pytest.raises(UserError, match=reads):
            block(torch.randn(2, 5, 32), cond)
