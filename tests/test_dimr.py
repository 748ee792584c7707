"""DiMR: published parameter counts, construction rules, options and errors (golden parity: test_dimr_parity.py)."""

from pathlib import Path

import pytest
import torch

import zoo
from zoo.errors import UserError

RECIPES = Path(__file__).parents[1] / "recipes"

TRANSFORMER = {"type": "transformer", "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": False, "norm": "td_rmsnorm",
               "mlp": "geglu_mlp"}  # fmt: skip
CONVNEXT = {"type": "convnext", "variant": "dimr", "kernel_size": 7, "mlp_ratio": 2.0, "norm": "td_rmsnorm", "mlp": "geglu_mlp"}


def tiny_spec(**overrides) -> dict:
    """A three-branch DiMR on 16x16 inputs: 4x4 Transformer, 8x8 and 16x16 ConvNeXt."""
    spec = {
        "type": "dimr", "in_channels": 3, "input_size": 16, "num_classes": 11,
        "branches": [
            {"dim": 16, "depth": 3, "patch_size": 4, "block": TRANSFORMER},
            {"dim": 8, "depth": 2, "patch_size": 2, "block": CONVNEXT},
            {"dim": 8, "depth": 1, "patch_size": 1, "block": CONVNEXT},
        ],
    }  # fmt: skip
    spec.update(overrides)
    return spec


def build(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build_model({"model": spec})


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "recipe, expected, paper",
    [
        ("dimr_m_3r", 132_828_681, 133e6), ("dimr_l_3r", 284_138_505, 284e6), ("dimr_xl_2r", 505_046_408, 505e6),
        ("dimr_xl_3r", 525_027_372, 525e6), ("dimr_g_2r", 1_056_352_904, 1.06e9),
        # DiMR Table 2 (rows 3-5; rows 1-2 are U-ViT recipes, tested with U-ViT)
        ("ablation/row3_multibranch_adaln_zero", 217_878_537, 217.9e6),
        ("ablation/row4_multibranch_tdln", 153_841_161, 154.0e6),
        ("ablation/row5_multibranch_tdln_glu", 132_828_681, 132.9e6),
    ],
)  # fmt: skip
def test_recipe_parameter_counts(recipe, expected, paper):
    with torch.device("meta"):
        model = zoo.build_model(RECIPES / f"{recipe}.yaml")
    assert params(model) == expected
    assert abs(expected - paper) / paper < 0.005


def test_meta_forward_and_example_inputs():
    with torch.device("meta"):
        model = zoo.build_model(RECIPES / "dimr_m_3r.yaml")
    x, t, y = model.example_inputs(2)
    assert x.device.type == "meta" and t.shape == (2,) and y.dtype == torch.long
    outputs = model(x, t, y)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]


def test_tiny_model_structure_and_init():
    model = build(tiny_spec())
    first, second, last = model.branches
    assert len(first.blocks) == 3 and len(second.blocks) == 3 and len(last.blocks) == 1  # 2*(nb//2)+1
    assert first.class_embed is not None and second.class_embed is None  # class token on Transformer only
    assert second.upsample.proj.in_features == 16 * 4 and last.upsample.proj.in_features == 8 * 4
    assert second.upsample.proj.out_features == 8 * 2 * 2
    qkv = first.blocks.in_blocks[0].attn.qkv
    assert qkv.bias is None and 0.015 < qkv.weight.std().item() < 0.025  # trunc-normal(0.02)
    assert torch.equal(first.blocks.skip_linears[0].bias, torch.zeros(16))
    x, t, y = model.example_inputs(2)
    outputs = model(x, t, y)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 4, 4), (2, 3, 8, 8), (2, 3, 16, 16)]


def test_time_and_label_change_the_prediction():
    model = build(tiny_spec())
    with torch.no_grad():
        for p in model.parameters():  # move the time-dependent parameters off their p0 = p1 init
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 3, 16, 16)
    base = model(x, torch.tensor([0.0]), torch.tensor([1]))[-1]
    assert not torch.allclose(base, model(x, torch.tensor([2.0]), torch.tensor([1]))[-1])
    assert not torch.allclose(base, model(x, torch.tensor([0.0]), torch.tensor([2]))[-1])
    torch.testing.assert_close(model(x, torch.tensor([0.0]))[-1], model(x, torch.tensor([0.0]), torch.tensor([10]))[-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build(tiny_spec())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 3.0]), torch.tensor([0, 5])

    def grads():
        model.zero_grad()
        sum(o.square().mean() for o in model(x, t, y)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(b.blocks.grad_checkpointing for b in model.branches)
    checkpointed = grads()
    assert all(plain[n] is not None for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_detach_handed_stops_gradients_into_lower_branches():
    model = build(tiny_spec(detach_handed=True))
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([0.5]), torch.tensor([0])
    model(x, t, y)[-1].square().mean().backward()
    assert model.branches[0].patch_embed.weight.grad is None
    assert model.branches[2].patch_embed.weight.grad is not None


def test_no_weight_decay_names_the_gates_only():
    model = build(tiny_spec())
    names = model.no_weight_decay()
    assert len(names) == 2 * (8 + 9 + 7)  # w, b of each time-dependent parameter: blocks, upsample, head
    assert names == {n for n, _ in model.named_parameters() if n.endswith((".w", ".b"))}


def _convnext(patch_size: int, downsample: int = 1) -> dict:
    return {"dim": 8, "depth": 1, "patch_size": patch_size, "downsample": downsample, "block": CONVNEXT}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"branches": []}, "at least one branch"),
        ({"branches": [_convnext(2)]}, "input resolution"),  # the last branch must work at 16x16
        ({"branches": [_convnext(1), _convnext(2)]}, "integer multiple"),  # 16x16 then 8x8: wrong order
        ({"input_size": 24, "branches": [_convnext(3), _convnext(2), _convnext(1)]}, "integer multiple"),  # 8 -> 12
        ({"branches": [_convnext(3), _convnext(1)]}, "divisible"),  # 16 px in 3x3 patches
        ({"branches": [{**_convnext(1), "depth": -1}]},
         r"depth must be an integer in \[0, 1024\] \(the official num_blocks: 2\*\(depth//2\)\+1 blocks, so 0 builds "
         r"one\), got -1"),
    ],
)  # fmt: skip
def test_bad_branch_layouts_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        build(tiny_spec(**change))


def test_depth_0_builds_one_block_as_the_official_num_blocks_0():
    """The official constructor builds 2*(num_blocks // 2) + 1 blocks, one for num_blocks 0; zoo refused
    depth 0, so such a checkpoint could not be converted."""
    spec = tiny_spec()
    shallow = [build({**spec, "branches": [{**spec["branches"][0], "depth": d}, *spec["branches"][1:]]})
               for d in (0, 1)]
    assert [list(m.state_dict()) for m in shallow][0] == list(shallow[1].state_dict())
    stack = shallow[0].branches[0].blocks
    assert len(stack.in_blocks) == len(stack.out_blocks) == 0 and stack.mid_block is not None  # one block


def test_unknown_branch_key_is_reported_with_its_path():
    spec = tiny_spec()
    spec["branches"][1] = {**spec["branches"][1], "dept": 3}
    with pytest.raises(UserError, match="dept") as err:
        build(spec)
    assert "branches.1" in str(err.value)


def test_time_token_on_a_convnext_branch_is_a_clear_error():
    spec = tiny_spec()
    spec["branches"][1] = {**spec["branches"][1], "block": {**CONVNEXT, "norm": "time_token"}}
    with pytest.raises(UserError, match="time-token conditioner cannot serve ConvNeXtBlock") as err:
        build(spec)
    assert err.value.key_path == "model.branches.1.block.norm"  # it said "key model", the whole section


def test_time_token_on_the_transformer_branch_adds_one_token():
    spec = tiny_spec()
    spec["branches"][0] = {**spec["branches"][0], "block": {**TRANSFORMER, "norm": "time_token"}}
    model = build(spec)
    assert model.branches[0].num_extra_tokens == 2  # class + time
    x = torch.randn(2, 3, 16, 16)
    a = model(x, torch.tensor([0.0, 0.0]), torch.tensor([1, 1]))[0]
    b = model(x, torch.tensor([3.0, 3.0]), torch.tensor([1, 1]))[0]
    assert not torch.allclose(a, b)  # the first branch has no time-dependent norms left: time enters via the token
