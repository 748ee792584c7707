"""What the backbones refuse: inputs they cannot take (at forward) and options that would do nothing
or hide a discarded path (at build), each in one UserError line instead of a deep torch error or
a model that silently ignores its labels, its time or its parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import zoo
from zoo.errors import UserError

DIT = dict(type="dit", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
UVIT = dict(type="uvit", img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=1, num_heads=2, num_classes=6)
TRANSFORMER = dict(dim=32, depth=1, patch_size=2, block=dict(type="transformer", num_heads=2, norm="td_rmsnorm"))
CONVNEXT = dict(dim=16, depth=1, patch_size=1, block=dict(type="convnext", norm="td_rmsnorm"))
DIMR = dict(type="dimr", in_channels=3, input_size=8, num_classes=6, branches=[TRANSFORMER, CONVNEXT])

# (model spec, channels, size, rows of its label table)
MODELS = {"DiT": (DIT, 4, 8, 6), "U-ViT": (UVIT, 3, 8, 6), "DiMR": (DIMR, 3, 8, 6)}


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    spec, channels, size, rows = MODELS[request.param]
    return request.param, zoo.build_model(spec).eval(), channels, size, rows


def test_inputs_that_fit_run_and_the_last_label_row_is_a_label(built):
    name, model, channels, size, rows = built
    x, t = torch.randn(2, channels, size, size), torch.full((2,), 0.5)
    with torch.no_grad():
        model(x, t, torch.tensor([0, rows - 1]))


def test_an_empty_batch_gives_empty_outputs(built):
    """DiMR raised "cannot reshape tensor of 0 elements" (an ambiguous -1) where DiT and U-ViT ran."""
    name, model, channels, size, rows = built
    with torch.no_grad():
        out = model(torch.randn(0, channels, size, size), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert all(o.shape[0] == 0 for o in (out if isinstance(out, list) else [out]))


@pytest.mark.parametrize("case", ["size", "channels", "rank"])
def test_an_image_of_the_wrong_shape_names_the_shape_the_model_takes(built, case):
    """Before: "The size of tensor a (64) must match the size of tensor b (16)" from a position table."""
    name, model, channels, size, rows = built
    shape = {"size": (2, channels, 2 * size, 2 * size), "channels": (2, channels + 1, size, size),
             "rank": (channels, size, size)}[case]
    with pytest.raises(UserError, match=re.escape(f"{name} takes x of shape (B, {channels}, {size}, {size}), got {shape}")):
        model(torch.randn(*shape), torch.full((shape[0],), 0.5))


@pytest.mark.parametrize("labels, message", [
    (lambda rows: torch.tensor([0, rows]), "label {rows} is out of range: this {name} embeds labels 0..{last}"),
    (lambda rows: torch.tensor([-1, 0]), "label -1 is out of range"),
    (lambda rows: [0, 1], "takes y as 2 integer labels .*, got list"),
    (lambda rows: torch.tensor([0.0, 1.0]), r"got torch.float32 of shape \(2,\)"),
    (lambda rows: torch.tensor([0, 1, 2]), r"got torch.int64 of shape \(3,\)"),
])
def test_labels_the_model_cannot_embed_are_one_line(built, labels, message):
    """Before: IndexError "index out of range in self" (on CUDA a device-side assert that breaks the
    context), or "embedding(): argument 'indices' must be Tensor"."""
    name, model, channels, size, rows = built
    x, t = torch.randn(2, channels, size, size), torch.full((2,), 0.5)
    with pytest.raises(UserError, match=message.format(rows=rows, name=name, last=rows - 1)):
        model(x, t, labels(rows))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_labels_of_an_integer_type_embedding_cannot_index_are_one_line(built, dtype):
    """Before: "Expected tensor for argument #1 'indices' to have one of the following scalar types:
    Long, Int" from inside nn.Embedding, though the check had passed them as integer labels."""
    name, model, channels, size, rows = built
    x, t = torch.randn(2, channels, size, size), torch.full((2,), 0.5)
    with pytest.raises(UserError, match=rf"{name} takes y as 2 integer labels \(int64 or int32.*got {dtype} .*y.long"):
        model(x, t, torch.tensor([0, 1], dtype=dtype))
    with torch.no_grad():
        out, out32 = model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([0, 1], dtype=torch.int32))
    for a, b in zip(*(o if isinstance(o, list) else [o] for o in (out, out32))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_image_of_another_dtype_names_both_dtypes(built):
    """Before: "Input type (double) and bias type (float) should be the same" from the patch conv,
    and "Input type (unsigned char) ..." for uint8 pixels. Under autocast another dtype is fine."""
    name, model, channels, size, rows = built
    x, t, y = torch.randn(2, channels, size, size), torch.full((2,), 0.5), torch.tensor([0, 1])
    with pytest.raises(UserError, match=f"{name} takes x as floating point .* got torch.uint8"):
        model(x.to(torch.uint8), t, y)
    with pytest.raises(UserError, match=f"{name} has torch.float32 weights but x is torch.float64 .*autocast"):
        model(x.double(), t, y)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.bfloat16(), t, y)


@pytest.mark.parametrize("t, message", [
    (None, "t must be a number or a tensor of 2 times, got NoneType"),
    ("0.5", "t must be a number or a tensor of 2 times, got str"),
    (torch.full((3,), 0.5), r"t must be one time or 2 times .* got shape \(3,\)"),
    (torch.full((2, 2), 0.5), r"got shape \(2, 2\)"),
    (torch.ones(2, dtype=torch.bool), "t must be real numbers, got torch.bool"),
])
def test_times_the_model_cannot_take_are_one_line(built, t, message):
    """Before: "The size of tensor a (3) must match the size of tensor b (2)" from inside a layer,
    "Could not infer dtype of NoneType", "new(): invalid data type 'str'"."""
    name, model, channels, size, rows = built
    with pytest.raises(UserError, match=message):
        model(torch.randn(2, channels, size, size), t, torch.tensor([0, 1]))


def test_one_time_for_the_batch_is_taken_in_every_form_by_every_backbone(built):
    """A number, a 0-dim, a one-element and a (B, 1) tensor all mean what (B,) means: U-ViT refused
    a (1,) time with a torch.cat size error where DiT and DiMR broadcast it."""
    name, model, channels, size, rows = built
    x, y = torch.randn(2, channels, size, size), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, torch.full((2,), 0.5), y)
        for t in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((2, 1), 0.5)):
            out = model(x, t, y)
            for a, b in zip(*(o if isinstance(o, list) else [o] for o in (out, ref))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_unconditional_model_refuses_labels_instead_of_ignoring_them():
    model = zoo.build_model({**UVIT, "num_classes": -1}).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0)
    with torch.no_grad():
        model(x, t)
    with pytest.raises(UserError, match="this U-ViT is unconditional"):
        model(x, t, torch.tensor([0, 3]))  # the output did not depend on them (max difference 0.0)


def test_label_values_are_not_read_on_the_meta_device():
    """The check reads label values on the CPU only: meta builds (FLOP counting) and accelerators skip it."""
    with torch.device("meta"):
        model = zoo.build_model(DIT)
    model(torch.empty(2, 4, 8, 8, device="meta"), torch.empty(2, device="meta"),
          torch.empty(2, dtype=torch.long, device="meta"))


def test_a_class_conditional_dimr_must_have_a_path_for_the_label():
    """An all-ConvNeXt DiMR with num_classes 10 gave the same output for every label: label dropout
    and guidance did nothing without a word."""
    convnext_only = {**DIMR, "branches": [dict(CONVNEXT, dim=32, patch_size=1)]}
    with pytest.raises(UserError, match="num_classes is 6, but no layer of this DiMR sees the label"):
        zoo.build_model(convnext_only)
    zoo.build_model({**convnext_only, "num_classes": 1})  # unconditional: only the null label
    adaln = dict(CONVNEXT, dim=32, block=dict(type="convnext", norm="adaln_zero"))
    model = zoo.build_model({**convnext_only, "branches": [adaln], "class_embedding": True})
    assert model.branches[0].y_embedder is not None


def test_class_embedding_without_an_embedding_conditioner_is_refused():
    """class_embedding feeds adaLN-Zero's embedding; with TD-RMSNorm everywhere it was silently ignored."""
    with pytest.raises(UserError, match="class_embedding adds the label .* no norm of this DiMR uses one"):
        zoo.build_model({**DIMR, "class_embedding": True})


@pytest.mark.parametrize("spec, message, key", [
    ({**DIMR, "norm": "time_token"}, "model.norm serves DiMR's hand-on and head norms", "model.norm"),
    ({**UVIT, "norm": "layernorm", "head_norm": "time_token"}, "time_token as head_norm would be a plain LayerNorm",
     "model.head_norm"),
])
def test_time_token_where_no_token_is_added_is_refused(spec, message, key):
    """Used as DiMR's model.norm or U-ViT's head_norm, time_token normalised like a plain LayerNorm:
    with plain block norms the model gave the same output at every t (the time-blind check missed it).
    The refusal names the key (DiMR's blamed the model section's first line)."""
    with pytest.raises(UserError, match=message) as err:
        zoo.build_model(spec)
    assert f"key {key}: " in str(err.value)


def test_norms_whose_gate_is_discarded_allocate_none_and_every_parameter_learns():
    """adaLN-Zero as DiMR's hand-on/head norm or U-ViT's head norm allocated gate rows that never got a
    gradient (~19.9M of DiMR-XL/2R's count with model.norm adaln_zero)."""
    for spec, name in (({**DIMR, "norm": "adaln_zero"}, "dimr"), ({**UVIT, "head_norm": "adaln_zero",
                                                                  "norm": "adaln_zero"}, "uvit")):
        gated = zoo.build_model(spec)
        explicit = zoo.build_model({**spec, ("norm" if name == "dimr" else "head_norm"): {"type": "adaln_zero",
                                                                                         "gate": False}})
        assert sum(p.numel() for p in gated.parameters()) == sum(p.numel() for p in explicit.parameters())
        for p in gated.parameters():  # adaLN-Zero starts at 0: give every weight a value, so gradients flow
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 3, 8, 8)
        t = torch.full((2,), 0.5 if name == "dimr" else 500.0)
        out = gated(x, t, torch.tensor([0, 1]))
        sum(o.square().sum() for o in (out if isinstance(out, list) else [out])).backward()
        unused = [n for n, p in gated.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert unused == [], unused


@pytest.mark.parametrize("name", ["dimr", "uvit"])
def test_a_gate_set_on_a_norm_whose_gate_is_discarded_is_refused_naming_the_key(name):
    """`gate: true` there kept the gate rows the default leaves out: parameters that count, take optimizer
    state and are saved, but never train."""
    key = "norm" if name == "dimr" else "head_norm"
    spec = {**DIMR} if name == "dimr" else {**UVIT, "norm": "adaln_zero"}
    with pytest.raises(UserError, match="gate is never read: gate: true would allocate parameters that never train") as err:
        zoo.build_model({**spec, key: {"type": "adaln_zero", "gate": True}})
    assert f"key model.{key}.gate: " in str(err.value) and "gate: false" in err.value.suggestion


def test_frequency_dim_without_an_embedding_conditioner_is_refused():
    with pytest.raises(UserError, match="frequency_dim sizes the timestep MLP .* so it would do nothing"):
        zoo.build_model({**UVIT, "frequency_dim": 64})
    model = zoo.build_model({**UVIT, "norm": "adaln_zero", "frequency_dim": 64})
    assert model.t_embedder.mlp[0].in_features == 64


def test_frequency_dims_default_spelled_out_is_no_change():
    """The default is 256 (it was None, so a U-ViT recipe that spelled 256 out was refused on --resume
    as 'model.frequency_dim differs (None there, 256 now)', and 256 without adaln_zero was refused)."""
    from zoo.training.rundir import check_resume_recipe

    spelled = {**UVIT, "frequency_dim": 256}
    zoo.build_model(spelled)
    check_resume_recipe({"model": UVIT}, {"model": spelled}, Path("run/last"))
    check_resume_recipe({"model": {**UVIT, "norm": "adaln_zero"}}, {"model": {**spelled, "norm": "adaln_zero"}},
                        Path("run/last"))
    with pytest.raises(UserError, match=r"model.frequency_dim differs from the checkpoint's \(256 there, 128 now\)"):
        check_resume_recipe({"model": spelled}, {"model": {**UVIT, "frequency_dim": 128}}, Path("run/last"))


@pytest.mark.parametrize("spec, tokens", [
    (UVIT, 16 + 2),                                                  # time token + label token
    ({**UVIT, "num_classes": 0}, 16 + 1),                           # unconditional: the time token only
    ({**UVIT, "norm": "td_layernorm"}, 16 + 1),                     # no time token; the label token stays
    ({**UVIT, "norm": "adaln_zero"}, 16),                           # the label rides in the embedding
    (DIMR, 16 + 1),                                                  # the 4x4 Transformer branch: label token
    ({**DIMR, "num_classes": 1}, 16 + 1),                           # unconditional: the null label's token
    ({**DIMR, "branches": [{**TRANSFORMER, "block": {**TRANSFORMER["block"], "norm": "time_token"}}, CONVNEXT]},
     16 + 2),
])  # fmt: skip
def test_the_token_count_a_block_sees_is_the_one_models_md_states(spec, tokens):
    """Authors of token-mixing blocks read L from the docs: U-ViT with TD-LN keeps its label token."""
    seen = []
    model = zoo.build_model(spec).eval()
    blocks = [m for m in model.modules() if type(m).__name__ == "TransformerBlock"]
    for block in blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    x, t, y = model.example_inputs(2)
    model(x, t, y)
    assert blocks and set(seen) == {tokens}
