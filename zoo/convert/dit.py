"""Official DiT (facebookresearch/DiT ``models.DiT``) checkpoints to zoo's ``dit`` backbone.

The key names match except two: each block's ``adaLN_modulation.1`` Linear(D → 6D) is split
row-wise into the two norms' Linear(D → 3D) (rows ``[:3D]`` = shift/scale/gate of the
attention branch → ``norm1``, the rest → ``norm2``), and the head's ``adaLN_modulation.1``
becomes ``final_layer.norm.linear``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from zoo.errors import UserError

# Official constructor kwargs (all of them map 1:1 onto zoo's DiT).
OFFICIAL_ARGS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "depth",
    "num_heads", "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma",
)  # fmt: skip

# Keys copied unchanged (regular expressions over the official names).
_SAME = re.compile(
    r"pos_embed|x_embedder\.proj\.(weight|bias)|t_embedder\.mlp\.[02]\.(weight|bias)"
    r"|y_embedder\.embedding_table\.weight|final_layer\.linear\.(weight|bias)"
    r"|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.(weight|bias)"
)
_BLOCK_ADALN = re.compile(r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)")
_FINAL_ADALN = re.compile(r"final_layer\.adaLN_modulation\.1\.(weight|bias)")


def matches_config(config: Mapping[str, Any]) -> bool:
    """An official DiT config has ``learn_sigma`` / ``class_dropout_prob``."""
    return "learn_sigma" in config or "class_dropout_prob" in config


def official_config_to_model_spec(config: Mapping[str, Any]) -> dict:
    """The official ``DiT(**config)`` kwargs as a recipe ``model`` section."""
    unknown = sorted(set(config) - set(OFFICIAL_ARGS))
    if unknown:
        raise UserError(f"unknown DiT config keys {unknown}; the official DiT takes {', '.join(OFFICIAL_ARGS)}")
    return {"type": "dit", **dict(config)}


def convert_state_dict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Rename/split an official DiT state dict into zoo's layout (tensors are shared, not copied)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _SAME.fullmatch(key):
            out[key] = value
        elif m := _BLOCK_ADALN.fullmatch(key):
            block, kind = m.groups()
            if value.shape[0] % 6:
                raise UserError(f"{key} has shape {tuple(value.shape)}; expected 6·hidden_size rows (adaLN-Zero)")
            attn_part, mlp_part = value.chunk(2, dim=0)
            out[f"blocks.{block}.norm1.linear.{kind}"] = attn_part
            out[f"blocks.{block}.norm2.linear.{kind}"] = mlp_part
        elif m := _FINAL_ADALN.fullmatch(key):
            out[f"final_layer.norm.linear.{m.group(1)}"] = value
        else:
            raise UserError(f"unexpected key {key!r} in the DiT state dict (is this an official DiT checkpoint?)")
    return out


_ADALN_BACK = re.compile(r"^(?:(blocks\.\d+)\.norm[12]\.linear\.|final_layer\.norm\.linear\.)")


def official_keys(name: str, config: Mapping[str, Any] | None = None) -> list[str]:
    """The official key(s) a zoo key is converted from (both halves of a block's adaLN come from one), for messages."""
    return [_ADALN_BACK.sub(lambda m: f"{m[1] or 'final_layer'}.adaLN_modulation.1.", name, count=1)]


def explain_shapes(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], recipe: Mapping[str, Any]) -> None:
    """A ``pos_embed`` of another length is a checkpoint for another resolution: say which ``model.input_size``
    fits (the table is the fixed sin-cos one, saved as a frozen parameter: its length is the token count)."""
    ours, theirs = expected.get("pos_embed"), state.get("pos_embed")
    if ours is None or theirs is None or theirs.dim() != 3 or theirs.shape[1] == ours.shape[1]:
        return
    grid, patch = int(round(theirs.shape[1] ** 0.5)), recipe["model"].get("patch_size", 2)
    if grid * grid != theirs.shape[1] or not isinstance(patch, int):
        return
    size = grid * patch
    latent = bool((recipe.get("data") or {}).get("latent"))
    pixels = size * 8 if latent else size  # the SD VAE's 8x downsampling
    also = ", or the dit_xl_2_512 recipe" if latent and size == 64 else ""
    raise UserError(f"the checkpoint's pos_embed has {theirs.shape[1]} positions and the model {ours.shape[1]}: "
                    f"it is a DiT for model.input_size {size} ({grid}x{grid} patches of {patch}, {pixels}px images)",
                    key_path="model.input_size",
                    suggestion=f"--set model.input_size={size} --set data.image_size={pixels}{also}")


def model_inputs(inputs: Mapping[str, Any]) -> tuple:
    """A golden file's inputs as ``model(x, t, y)`` arguments (``t`` is the DDPM index)."""
    return inputs["x"], inputs["t"], inputs.get("y")
