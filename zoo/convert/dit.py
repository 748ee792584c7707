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


def _architecture(state: Mapping[str, Tensor]) -> tuple[int, int, int, int] | None:
    """(hidden_size, depth, patch_size, tokens) a DiT state dict's shapes say, or None where they cannot."""
    pos, proj = state.get("pos_embed"), state.get("x_embedder.proj.weight")
    if pos is None or proj is None or pos.dim() != 3 or proj.dim() != 4:
        return None
    depth = 1 + max((int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)), default=-1)
    return int(pos.shape[2]), depth, int(proj.shape[-1]), int(pos.shape[1])


def explain_shapes(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], recipe: Mapping[str, Any]) -> None:
    """A checkpoint of another DiT: say which one its shapes say (width, depth, patch, and the ``model.input_size``
    the length of its fixed sin-cos ``pos_embed`` gives) and the shipped recipe of that model, where there is one."""
    from zoo.training.data import gives_latents

    theirs, ours = _architecture(state), _architecture(expected)
    if theirs is None or ours is None or theirs == ours:
        return
    width, depth, patch, tokens = theirs
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        return
    size = grid * patch
    latent = gives_latents(recipe.get("data") or {})
    pixels = size * 8 if latent else size  # the SD VAE's 8x downsampling
    where = f"model.input_size {size} ({grid}x{grid} patches of {patch}, {pixels}px images)"
    if (width, depth, patch) == ours[:3]:  # the same model at another resolution
        also = ", or the dit_xl_2_512 recipe" if latent and size == 64 and width == 1152 else ""
        raise UserError(f"the checkpoint's pos_embed has {tokens} positions and the model {ours[3]}: it is a DiT "
                        f"for {where}", key_path="model.input_size",
                        suggestion=f"--set model.input_size={size} --set data.image_size={pixels}{also}")
    shipped = _shipped_dit(width, depth, patch, size)
    raise UserError(f"the checkpoint is a DiT of hidden_size {width}, depth {depth}, patch_size {patch} for {where}; "
                    f"the recipe builds hidden_size {ours[0]}, depth {ours[1]}, patch_size {ours[2]}",
                    key_path="model",
                    suggestion=f"use --recipe {shipped}" if shipped else
                    "use a recipe with those settings (num_heads as the checkpoint was trained)")


def _shipped_dit(width: int, depth: int, patch: int, size: int) -> str | None:
    """The shipped DiT recipe of that model (``dit_s_4``), or None."""
    import zoo
    from zoo.recipe import shipped_recipe_names

    for name in shipped_recipe_names():
        if name.startswith("dit_"):
            model = zoo.load_recipe(name)["model"]
            if (model["hidden_size"], model["depth"], model["patch_size"], model["input_size"]) == (
                    width, depth, patch, size):
                return name.removesuffix(".yaml")
    return None


def model_inputs(inputs: Mapping[str, Any]) -> tuple:
    """A golden file's inputs as ``model(x, t, y)`` arguments (``t`` is the DDPM index)."""
    return inputs["x"], inputs["t"], inputs.get("y")
