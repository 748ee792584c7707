"""Official U-ViT (baofff/U-ViT ``libs.uvit.UViT``) checkpoints to zoo's ``uvit`` backbone.

Only the block stack moves: the official ``in_blocks`` / ``mid_block`` / ``out_blocks`` live
under zoo's ``blocks`` (a :class:`~zoo.blocks.skip_stack.LongSkipStack`), and each out-block's
``skip_linear`` becomes the stack's ``skip_linears.i``. Inside a block the names already match
(``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), as do the
token, time and head parts (``patch_embed.proj``, ``pos_embed``, ``label_emb``,
``time_embed.0/2``, ``norm``, ``decoder_pred``, ``final_layer``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from zoo.errors import UserError

# Official constructor kwargs that map 1:1 onto zoo's UViT.
OFFICIAL_ARGS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "qkv_bias", "mlp_time_embed", "num_classes", "use_checkpoint", "conv", "skip",
)  # fmt: skip
# Official kwargs accepted only at the value zoo implements (checked below), then dropped. The official
# attention computes with F.scaled_dot_product_attention's own scale whenever PyTorch 2 is installed (its
# 'flash' mode), so a qk_scale never reaches its outputs: dropped too, as the model ran.
_FIXED_ARGS = ("qk_scale", "norm_layer", "name")

_SAME = re.compile(
    r"pos_embed|patch_embed\.proj\.(weight|bias)|label_emb\.weight|time_embed\.[02]\.(weight|bias)"
    r"|norm\.(weight|bias)|decoder_pred\.(weight|bias)|final_layer\.(weight|bias)"
)
_BLOCK_PART = r"(norm[12]\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
_STACK = re.compile(rf"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.{_BLOCK_PART}")
_SKIP = re.compile(r"out_blocks\.(\d+)\.skip_linear\.(weight|bias)")


def matches_config(config: Mapping[str, Any]) -> bool:
    """An official U-ViT config has ``embed_dim`` and ``in_chans`` (DiT says ``hidden_size``)."""
    return "embed_dim" in config and "in_chans" in config


def _check_fixed(config: Mapping[str, Any]) -> None:
    if config.get("name", "uvit") != "uvit":
        raise UserError(
            f"config name {config['name']!r} is not the plain U-ViT ('uvit'); text-to-image U-ViT is not supported"
        )
    norm_layer = config.get("norm_layer")
    if norm_layer is not None and getattr(norm_layer, "__name__", norm_layer) not in ("LayerNorm", "nn.LayerNorm"):
        raise UserError(f"norm_layer={norm_layer!r} is not supported; U-ViT's is nn.LayerNorm")


def official_config_to_model_spec(config: Mapping[str, Any]) -> dict:
    """The official ``UViT(**config)`` kwargs as a recipe ``model`` section."""
    unknown = sorted(set(config) - set(OFFICIAL_ARGS) - set(_FIXED_ARGS))
    if unknown:
        raise UserError(
            f"unknown U-ViT config keys {unknown}; the official U-ViT takes {', '.join(OFFICIAL_ARGS + _FIXED_ARGS)}"
        )
    _check_fixed(config)
    spec = {"type": "uvit", **{k: v for k, v in config.items() if k in OFFICIAL_ARGS}}
    if spec.get("skip", True):
        spec.pop("skip", None)  # the default: recipes and configs without the key stay alike
    return spec


def convert_state_dict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Rename an official U-ViT state dict into zoo's layout (tensors are shared, not copied)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _SAME.fullmatch(key):
            out[key] = value
        elif m := _SKIP.fullmatch(key):
            out[f"blocks.skip_linears.{m.group(1)}.{m.group(2)}"] = value
        elif _STACK.fullmatch(key):
            out[f"blocks.{key}"] = value
        else:
            raise UserError(f"unexpected key {key!r} in the U-ViT state dict (is this an official U-ViT checkpoint?)")
    return out


def official_keys(name: str, config: Mapping[str, Any] | None = None) -> list[str]:
    """The official key a zoo key is converted from, for messages."""
    if m := re.fullmatch(r"blocks\.skip_linears\.(\d+)\.(.+)", name):
        return [f"out_blocks.{m[1]}.skip_linear.{m[2]}"]
    return [name.removeprefix("blocks.")]


def model_inputs(inputs: Mapping[str, Any]) -> tuple:
    """A golden file's inputs as ``model(x, t, y)`` arguments (``t`` is the raw sinusoid input)."""
    return inputs["x"], inputs["t"], inputs.get("y")
