"""Official DiMR (qihao067/DiMR ``MRModel``) configs and checkpoints to zoo's ``dimr`` backbone.

Config: each official ``stage_configs`` entry becomes one branch of ``model.branches``
(``num_blocks`` → ``depth``, ``input_feature_ratio`` → ``patch_size``, ``image_input_ratio`` →
``downsample``, ``final_kernel_size`` → ``head_kernel_size``, ``hidden_dim / dim`` → the block's
``mlp_ratio``); ``block_grad_to_lowres`` → ``detach_handed``.

Weights: ``stages.i`` → ``branches.i``; the official flat ``blocks.j`` list (2h+1 blocks)
→ the long-skip stack's ``in_blocks.j`` / ``mid_block`` / ``out_blocks.(j−h−1)``; the GeGLU
``w0``, ``w1`` → the fused ``mlp.fc1`` = [w0 | w1] (w0 is the GELU half), ``w2`` → ``mlp.fc2``;
time-dependent ``param0 / param1 / nodecay_weight / nodecay_bias`` → ``p0 / p1 / w / b``; the
position table ``(g·g, C)`` → ``(1, g, g, C)``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from zoo.errors import UserError

OFFICIAL_ARGS = ("channels", "num_classes", "block_grad_to_lowres", "norm_type", "stage_configs")
_STAGE_ARGS = {
    "TransformerBlock": {"block_type", "dim", "hidden_dim", "num_attention_heads", "num_blocks"},
    "ConvNeXtBlock": {"block_type", "dim", "hidden_dim", "kernel_size", "num_blocks"},
}
_STAGE_COMMON = {"max_height", "max_width", "image_input_ratio", "input_feature_ratio", "final_kernel_size", "dropout_prob"}
_NORMS = {"TDRMSN": "td_rmsnorm"}  # the only norm_type of the released configs
_TDP = {"param0": "p0", "param1": "p1", "nodecay_weight": "w", "nodecay_bias": "b"}
_TDP_RE = r"(param0|param1|nodecay_weight|nodecay_bias)"


def matches_config(config: Mapping[str, Any]) -> bool:
    """An official DiMR config has ``stage_configs``."""
    return "stage_configs" in config


def _block_spec(i: int, stage: Mapping[str, Any], norm: str) -> dict:
    kind = stage.get("block_type")
    if kind not in _STAGE_ARGS:
        raise UserError(f"stage_configs[{i}].block_type {kind!r} is not one of {sorted(_STAGE_ARGS)}")
    unknown = set(stage) - _STAGE_ARGS[kind] - _STAGE_COMMON
    if unknown:
        raise UserError(f"stage_configs[{i}]: unknown keys {sorted(unknown)} for a {kind}")
    if stage.get("dropout_prob", 0):
        raise UserError(f"stage_configs[{i}].dropout_prob = {stage['dropout_prob']}: zoo's DiMR has no dropout (use 0)")
    if stage["hidden_dim"] % stage["dim"] and (2 * stage["hidden_dim"]) % stage["dim"]:
        raise UserError(f"stage_configs[{i}]: hidden_dim {stage['hidden_dim']} is not a multiple of dim/2")
    mlp_ratio = stage["hidden_dim"] / stage["dim"]
    if kind == "TransformerBlock":
        return {"type": "transformer", "num_heads": stage["num_attention_heads"], "mlp_ratio": mlp_ratio,
                "qkv_bias": False, "norm": norm, "mlp": "geglu_mlp"}  # fmt: skip
    return {"type": "convnext", "variant": "dimr", "kernel_size": stage["kernel_size"], "mlp_ratio": mlp_ratio,
            "norm": norm, "mlp": "geglu_mlp"}  # fmt: skip


def official_config_to_model_spec(config: Mapping[str, Any]) -> dict:
    """The official ``MRModel(**config)`` kwargs as a recipe ``model`` section."""
    unknown = sorted(set(config) - set(OFFICIAL_ARGS))
    if unknown:
        raise UserError(f"unknown DiMR config keys {unknown}; the official MRModel takes {', '.join(OFFICIAL_ARGS)}")
    norm_type = config.get("norm_type", "LN")  # MRModel's own default where its config names none
    if norm_type not in _NORMS:
        raise UserError(f"DiMR norm_type {norm_type!r} is not supported; zoo converts {sorted(_NORMS)}")
    branches, input_size = [], None
    for i, stage in enumerate(config["stage_configs"]):
        if stage["max_height"] != stage["max_width"]:
            raise UserError(f"stage_configs[{i}]: only square grids are supported (max_height = max_width)")
        down, patch = stage.get("image_input_ratio", 1), stage.get("input_feature_ratio", 1)
        size = stage["max_height"] * down * patch
        if input_size not in (None, size):
            raise UserError(f"stage_configs[{i}] implies a {size}px input, stage 0 a {input_size}px one")
        input_size = size
        branches.append({
            "dim": stage["dim"], "depth": stage["num_blocks"], "block": _block_spec(i, stage, _NORMS[norm_type]),
            "patch_size": patch, "downsample": down, "head_kernel_size": stage.get("final_kernel_size", 3),
        })  # fmt: skip
    return {
        "type": "dimr", "in_channels": config["channels"], "input_size": input_size,
        "num_classes": config["num_classes"], "branches": branches,
        "detach_handed": bool(config.get("block_grad_to_lowres", False)),
    }  # fmt: skip


_BLOCK_TYPES = {"transformer": "TransformerBlock", "convnext": "ConvNeXtBlock"}


def config_from_recipe(model: Mapping[str, Any]) -> dict:
    """The part of the official config the key layout depends on (each stage's block kind and
    ``num_blocks``), read from a recipe's ``model`` section: the released checkpoints hold no config,
    and the recipe names the same model. Strict loading checks everything else by shape."""
    stages = []
    for i, branch in enumerate(model.get("branches") or []):
        block = branch.get("block") if isinstance(branch, Mapping) else None
        kind = block if isinstance(block, str) else block.get("type") if isinstance(block, Mapping) else None
        if kind not in _BLOCK_TYPES or not isinstance(branch.get("depth"), int):
            raise UserError(f"the recipe's model.branches.{i} is not an official DiMR stage (block {kind!r})",
                            suggestion="pass the official MRModel kwargs as --config FILE (JSON)")
        stages.append({"block_type": _BLOCK_TYPES[kind], "num_blocks": branch["depth"]})
    return {"stage_configs": stages}


def _block_prefix(j: int, num_blocks: int) -> str:
    """Official flat block index → zoo long-skip stack path."""
    half = num_blocks // 2
    if j < half:
        return f"in_blocks.{j}"
    if j == half:
        return "mid_block"
    if j <= 2 * half:
        return f"out_blocks.{j - half - 1}"
    raise UserError(f"block index {j} is out of range for num_blocks={num_blocks}")


_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"input_layer\.1\.(weight|bias)"), lambda m, s: f"patch_embed.{m[1]}"),
    (re.compile(r"input_layer\.3\.position_embeddings\.weight"), lambda m, s: "pos_embed"),
    (re.compile(r"class_embeds\.weight"), lambda m, s: "class_embed.weight"),
    (re.compile(r"skip_denses\.(\d+)\.(weight|bias)"), lambda m, s: f"blocks.skip_linears.{m[1]}.{m[2]}"),
    (re.compile(r"output_layer\.0\.(weight|bias)\." + _TDP_RE), lambda m, s: f"head_norm.{m[1]}.{_TDP[m[2]]}"),
    (re.compile(r"output_layer\.2\.(weight|bias)"), lambda m, s: f"head.{m[1]}"),
    (re.compile(r"upsample\.0\.(weight|bias)\." + _TDP_RE), lambda m, s: f"upsample.norm_in.{m[1]}.{_TDP[m[2]]}"),
    (re.compile(r"upsample\.1\.kernel\.(weight|bias)"), lambda m, s: f"upsample.proj.{m[1]}"),
    (re.compile(r"upsample\.2\.(weight|bias)\." + _TDP_RE), lambda m, s: f"upsample.norm_out.{m[1]}.{_TDP[m[2]]}"),
]
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_IN_BLOCK: dict[str, list[tuple[re.Pattern, Any]]] = {
    "TransformerBlock": [
        (re.compile(r"block1\.norm\.scale\." + _TDP_RE), lambda m: f"norm1.weight.{_TDP[m[1]]}"),
        (re.compile(r"block1\.query_key_value\.weight"), lambda m: "attn.qkv.weight"),
        (re.compile(r"block1\.dense\.(weight|bias)"), lambda m: f"attn.proj.{m[1]}"),
        (re.compile(r"block2\.norm\.scale\." + _TDP_RE), lambda m: f"norm2.weight.{_TDP[m[1]]}"),
    ],
    "ConvNeXtBlock": [
        (re.compile(r"block1\.1\.(weight|bias)"), lambda m: f"dwconv.{m[1]}"),
        (re.compile(r"block2\.norm\.scale\." + _TDP_RE), lambda m: f"norm.weight.{_TDP[m[1]]}"),
    ],
}
_MLP_RE = re.compile(r"block2\.w([012])\.(weight|bias)")


def zoo_key(key: str, config: Mapping[str, Any]) -> tuple[str, int | None]:
    """The zoo name of an official key, and for GeGLU ``w0``/``w1`` which half of ``fc1`` it is."""
    m = re.fullmatch(r"stages\.(\d+)\.(.+)", key)
    stages = config["stage_configs"]
    if not m or int(m[1]) >= len(stages):
        raise UserError(f"unexpected key {key!r} in the DiMR state dict (is this an official DiMR checkpoint?)")
    i, rest = int(m[1]), m[2]
    stage = stages[i]
    for pattern, name in _RULES:
        if mm := pattern.fullmatch(rest):
            return f"branches.{i}.{name(mm, stage)}", None
    if mm := _BLOCK_RE.fullmatch(rest):
        blocks = 2 * (stage["num_blocks"] // 2) + 1  # the long-skip stack: in, mid, out
        if int(mm[1]) >= blocks:
            raise UserError(f"the checkpoint's key {key!r} is block {mm[1]} of stage {i}, which has {blocks} "
                            f"blocks for num_blocks {stage['num_blocks']} (branch {i}'s depth)",
                            suggestion="use the recipe (or --config) of this checkpoint's model")
        prefix = f"branches.{i}.blocks.{_block_prefix(int(mm[1]), stage['num_blocks'])}"
        if mlp := _MLP_RE.fullmatch(mm[2]):
            part = int(mlp[1])
            return f"{prefix}.mlp.{'fc2' if part == 2 else 'fc1'}.{mlp[2]}", (None if part == 2 else part)
        for pattern, name in _IN_BLOCK.get(stage["block_type"], []):
            if inner := pattern.fullmatch(mm[2]):
                return f"{prefix}.{name(inner)}", None
    raise UserError(f"unexpected key {key!r} in the DiMR state dict (is this an official DiMR checkpoint?)")


# zoo name inside a branch → official name inside a stage (prefixes; a time-dependent parameter's last part
# p0/p1/w/b is renamed apart), for messages: the inverse of _RULES and _IN_BLOCK.
_BACK = [(re.compile(a), b) for a, b in (
    (r"patch_embed\.", "input_layer.1."), (r"pos_embed$", "input_layer.3.position_embeddings.weight"),
    (r"class_embed\.", "class_embeds."), (r"blocks\.skip_linears\.", "skip_denses."),
    (r"head_norm\.", "output_layer.0."), (r"head\.", "output_layer.2."), (r"upsample\.norm_in\.", "upsample.0."),
    (r"upsample\.proj\.", "upsample.1.kernel."), (r"upsample\.norm_out\.", "upsample.2."),
)]  # fmt: skip
_BLOCK_BACK = [(re.compile(a), b) for a, b in (
    (r"norm1\.weight\.", "block1.norm.scale."), (r"attn\.qkv\.", "block1.query_key_value."),
    (r"attn\.proj\.", "block1.dense."), (r"norm2?\.weight\.", "block2.norm.scale."), (r"dwconv\.", "block1.1."),
    (r"mlp\.fc2\.", "block2.w2."), (r"mlp\.fc1\.", "block2.w0."),
)]  # fmt: skip
_BACK_TDP = {v: k for k, v in _TDP.items()}
_STACK_RE = re.compile(r"blocks\.(?:in_blocks\.(\d+)|(mid_block)|out_blocks\.(\d+))\.(.+)")


def official_keys(name: str, config: Mapping[str, Any]) -> list[str]:
    """The official key(s) a zoo key is converted from (``mlp.fc1`` from both GeGLU halves), for messages."""
    m = re.fullmatch(r"branches\.(\d+)\.(.+)", name)
    stages = config.get("stage_configs") or []
    if not m or int(m[1]) >= len(stages):
        return [name]
    i, rest = int(m[1]), m[2]
    rest = re.sub(r"\.(p0|p1|w|b)$", lambda t: f".{_BACK_TDP[t[1]]}", rest)
    if block := _STACK_RE.fullmatch(rest):
        half = stages[i].get("num_blocks", 0) // 2
        j = int(block[1]) if block[1] else half if block[2] else half + 1 + int(block[3])
        rest = f"blocks.{j}.{_first_sub(_BLOCK_BACK, block[4])}"
        if ".block2.w0." in rest:
            return [f"stages.{i}.{rest}", f"stages.{i}.{rest.replace('.block2.w0.', '.block2.w1.')}"]
    else:
        rest = _first_sub(_BACK, rest)
    return [f"stages.{i}.{rest}"]


def _first_sub(rules: list, text: str) -> str:
    """``text`` with the first rule whose pattern starts it applied (unchanged if none does)."""
    for pattern, repl in rules:
        if pattern.match(text):
            return pattern.sub(repl, text, count=1)
    return text


# A key only one kind of stage has in each block: names the block kind of a checkpoint's stage.
_KIND_KEYS = {"TransformerBlock": "block1.query_key_value.weight", "ConvNeXtBlock": "block1.1.weight"}
_KIND_NAMES = {"TransformerBlock": "transformer", "ConvNeXtBlock": "ConvNeXt"}


def check_layout(state_dict: Mapping[str, Tensor], stages: list) -> None:
    """The checkpoint's number of stages and each stage's block kind against the recipe's branches: an official
    checkpoint of another model says so, not "unexpected key 'stages.2...'" (is this DiMR at all?)."""
    n = max((int(m[1]) + 1 for key in state_dict if (m := re.match(r"stages\.(\d+)\.", key))), default=0)
    if n > len(stages):  # fewer: strict loading names the missing stages' keys
        raise UserError(f"the checkpoint has {n} stages (stages.0 to stages.{n - 1}) and the recipe {len(stages)} "
                        "branches", key_path="model.branches", suggestion=f"use a recipe with {n} branches, such as "
                        f"the shipped dimr_*_{n}r ones, with the checkpoint's official config as --config if you "
                        "have it")  # fmt: skip
    for i, stage in enumerate(stages):
        kinds = {kind for kind, tail in _KIND_KEYS.items()
                 if any(re.fullmatch(rf"stages\.{i}\.blocks\.\d+\.{re.escape(tail)}", k) for k in state_dict)}
        if len(kinds) == 1 and stage.get("block_type") not in kinds:
            ours = _KIND_NAMES.get(stage.get("block_type"), stage.get("block_type"))
            raise UserError(f"stage {i} of the checkpoint holds {_KIND_NAMES[kinds.pop()]} blocks while the recipe's "
                            f"branch {i} is a {ours} branch",
                            key_path=f"model.branches.{i}.block", suggestion="use the recipe of this checkpoint's "
                            "model, with its official config as --config if you have it")


def convert_state_dict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """Rename an official DiMR state dict into zoo's layout; fuses GeGLU ``w0``/``w1`` into ``fc1``.

    The key layout depends on each stage's block kind and depth, so the official constructor
    config (``stage_configs``) is required.
    """
    if not isinstance(config, Mapping) or "stage_configs" not in config:
        raise UserError(
            "converting a DiMR checkpoint needs the official constructor config (its stage_configs): "
            "config_from_recipe(recipe['model']) reads it from the recipe of the checkpoint's model (zoo convert "
            "does), or pass --config FILE, a JSON object of the MRModel kwargs"
        )
    check_layout(state_dict, config["stage_configs"])
    out: dict[str, Tensor] = {}
    halves: dict[str, dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        name, half = zoo_key(key, config)
        if half is not None:
            halves.setdefault(name, {})[half] = value
        elif name.endswith("pos_embed"):
            grid = int(round(value.shape[0] ** 0.5)) if value.dim() == 2 else 0
            if grid * grid != value.shape[0] or value.dim() != 2:  # the official table is (grid², dim)
                raise UserError(f"{key} has shape {tuple(value.shape)}; an official position table is "
                                "(positions, dim) with a square number of positions (is the file damaged?)")
            out[name] = value.reshape(1, grid, grid, value.shape[1])
        else:
            out[name] = value
    for name, parts in halves.items():
        if set(parts) != {0, 1}:
            raise UserError(f"GeGLU weights for {name} need both w0 and w1; the state dict has only w{min(parts)}")
        if parts[0].shape != parts[1].shape:
            raise UserError(f"GeGLU weights for {name}: w0 {tuple(parts[0].shape)} and w1 {tuple(parts[1].shape)} "
                            "differ in shape (is the file damaged?)")
        out[name] = torch.cat([parts[0], parts[1]], dim=0)
    return out


def model_inputs(inputs: Mapping[str, Any]) -> tuple:
    """A golden file's inputs as ``model(x, t, y)`` arguments (``t`` is DiMR's ``log_snr``)."""
    return inputs["x"], inputs["log_snr"], inputs.get("y")
