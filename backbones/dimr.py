"""DiMR (Liu et al. 2024, "Alleviating Distortion in Image Generation via Multi-Resolution
Diffusion Models"): R branches from low to high resolution, each refining the last.

Branch r reads the full-resolution input (optional area-downsample, Conv2d patchify, learned
position table), adds the previous branch's features handed on through TD-LN → Linear →
sub-pixel shuffle → TD-LN (eq. 2: ``Patchify(x) + Upsample(y_{r−1})``), runs a U-ViT long-skip
stack of its blocks (Transformer branches also see a class token), and predicts the noise at
its resolution with TD-LN + Conv 3×3. Time enters only through the time-dependent norms (the
released form); any other conditioner can be swapped in per branch (adaLN-Zero gives
the branch its own time/class embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from zoo.conditioning.base import Conditioning, adds_time_token, as_time_vector, time_blind
from zoo.conditioning.time_dependent import TimeDependentLayerNorm, no_weight_decay_names
from zoo.domains import (MAX_CLASSES, MAX_DEPTH, MAX_SIZE, Calls, Channels, ConditionerFactory, Doc, ImageSize, NonEmpty,
                         PatchSize, Range, Rule, Width)
from zoo.errors import UserError

from .common import PosEmbedInit, check_inputs, init_pos_embed_
from .dimr_branch import DiMRBranch


@dataclass(frozen=True)
class BranchConfig:
    """One DiMR branch (a recipe's ``model.branches`` item).

    Attributes:
        dim: width C of the branch.
        depth: the official ``num_blocks``: builds 2⌊depth/2⌋+1 blocks with U-ViT long skips (0 and 1:
            one block, as the official constructor builds).
        block: block factory, called as ``block(dim, cond_dim=dim)`` (Transformer or ConvNeXt, with its norm).
        patch_size: Conv2d patchify kernel = stride.
        downsample: area-downsample factor of the input before patchifying.
        head_kernel_size: kernel of the output Conv2d (padding k // 2).
    """

    dim: Width
    depth: Annotated[int, Range(0, MAX_DEPTH), Doc("the official num_blocks: 2*(depth//2)+1 blocks, so 0 builds one")]
    block: Annotated[Callable[..., nn.Module], Calls(1, ("cond_dim",))]
    patch_size: PatchSize = 1
    downsample: Annotated[int, Range(1, MAX_SIZE)] = 1
    head_kernel_size: Annotated[int, Range(1, 31)] = 3

    constraints = (
        Rule("head_kernel_size odd (keeps the map size)", lambda head_kernel_size: head_kernel_size % 2 == 1,
             ("head_kernel_size",)),
        Rule("dim divisible by the block's num_heads", lambda dim, block: _heads_divide(dim, block), ("dim", "block")),
    )


def _heads_divide(dim: int, block: Any) -> str | None:
    heads = getattr(block, "keywords", {}).get("num_heads")
    if isinstance(heads, int) and heads > 0 and dim % heads:
        return f"dim={dim} must be divisible by the block's num_heads={heads}"
    return None


#: ``model.grad_checkpointing``: one switch for every branch, or one per branch (lowest resolution first).
BranchFlags = Annotated[bool | list[bool], Doc("one for all branches, or a list with one per branch, lowest resolution first")]


def branch_flags(value: bool | Sequence[bool], count: int) -> list[bool]:
    """``value`` as one boolean per branch; a list of the wrong length is a :class:`UserError`."""
    if isinstance(value, bool):
        return [value] * count
    flags = list(value)
    if len(flags) != count or not all(isinstance(f, bool) for f in flags):
        raise UserError(f"model.grad_checkpointing: {flags!r} must be true, false or a list of {count} booleans "
                        f"(one per branch, lowest resolution first)")
    return flags


def _flags_problem(grad_checkpointing: Any, branches: Sequence[Any]) -> str | None:
    if isinstance(grad_checkpointing, list) and len(grad_checkpointing) != len(branches):
        return (f"grad_checkpointing lists {len(grad_checkpointing)} booleans but the model has {len(branches)} "
                "branches: give one per branch, lowest resolution first, or a single true/false")
    return None


def branch_layout_problem(input_size: int, branches: Sequence[Any]) -> str | None:
    """What is wrong with the branch grids (``input_size / downsample / patch_size``), or ``None``.

    There is at least one branch; every grid divides the input exactly, each is an integer
    multiple of the previous one (low to high resolution), and the last is the input resolution.
    """
    if not branches:
        return "DiMR needs at least one branch in model.branches"
    prev = None
    for i, spec in enumerate(branches):
        step = spec.downsample * spec.patch_size
        if input_size % step:
            return (f"model.branches[{i}]: input_size {input_size} is not divisible by downsample x patch_size "
                    f"= {spec.downsample} x {spec.patch_size}")
        grid = input_size // step
        if prev is not None and (grid % prev or grid < prev):
            return (f"model.branches[{i}]: its {grid}x{grid} grid is not an integer multiple of the previous "
                    f"branch's {prev}x{prev}; order branches from low to high resolution")
        prev = grid
    if prev != input_size:
        return (f"model.branches: the last branch works on a {prev}x{prev} grid but must work at the input "
                f"resolution {input_size}; set its patch_size and downsample to 1")
    return None


class DiMR(nn.Module):
    """Multi-resolution diffusion backbone on ``(B, in_channels, input_size, input_size)``.

    ``branches`` lists the R branches (:class:`BranchConfig`: dim, depth, block, patch_size,
    downsample, head_kernel_size) from lowest to highest resolution. Branch grids
    (``input_size / downsample / patch_size``) must grow by integer ratios and the last must be
    the input resolution. ``norm`` is the conditioner of the hand-on and head norms (TD-LN).
    ``num_classes`` counts the null label (1001 for ImageNet); a Transformer branch prepends
    the class token.

    ``forward(x, t, y)`` takes ``t`` = DiMR's ``log_snr`` input (8n/N − 4 for DDPM step n of N, 8n/1000 − 4 as released)
    and returns the R noise predictions, lowest resolution first (the last is the model's);
    ``y=None`` means the null label ``num_classes − 1`` (unconditional).
    A branch whose conditioners need an embedding (adaLN-Zero) gets its own timestep MLP
    (DiT's, fed the DDPM step); ``class_embedding`` adds a label embedding to it (DiT's
    c = t + y; off by default, as the class enters DiMR through the Transformer's class token).
    ``detach_handed`` stops gradients from flowing into lower branches through the hand-on
    (the official ``block_grad_to_lowres``); ``grad_checkpointing`` recomputes block
    activations in the backward pass (the official code always does; here it is optional),
    in every branch (``true``) or in the branches a list of booleans picks, lowest resolution
    first (``[false, true]``: only the high-resolution branch of a 2R model; ``zoo.memory``
    estimates what each choice saves, and benchmarks/paper_recipes.py reports it).
    ``pos_embed_init``: ``normal`` (the released trunc-normal 0.02) or ``sincos`` (each branch's
    table starts from the 2-D sin-cos table and is still learned; the emoji32 demo uses it).
    """

    #: the ``diffusion.time_input`` this backbone reads as it was built to (log-SNR-like, −4..4)
    time_inputs = ("dimr_log_snr",)

    constraints = (Rule("branch grids that divide input_size and grow by integer ratios to it",
                        branch_layout_problem, ("input_size", "branches")),
                   Rule("grad_checkpointing true, false or one boolean per branch", _flags_problem,
                        ("grad_checkpointing", "branches")))

    def __init__(
        self,
        in_channels: Channels = 4,
        input_size: ImageSize = 32,
        num_classes: Annotated[int, Range(1, MAX_CLASSES), Doc("1 = unconditional: the null label only")] = 1001,
        branches: Annotated[Sequence[BranchConfig], NonEmpty, Doc("lowest resolution first")] = (),
        norm: ConditionerFactory = TimeDependentLayerNorm,
        class_embedding: bool = False,
        detach_handed: bool = False,
        grad_checkpointing: BranchFlags = False,
        pos_embed_init: PosEmbedInit = "normal",
    ):
        super().__init__()
        if adds_time_token(norm):
            raise UserError("model.norm serves DiMR's hand-on and head norms, which see feature maps, not the token "
                            "sequence a time token joins: there time_token would be a plain LayerNorm",
                            key_path="model.norm",
                            suggestion="use time_token as a Transformer block's norm; here td_layernorm (DiMR's) or adaln_zero")
        branches = [self._check_branch(i, spec) for i, spec in enumerate(branches)]
        problem = branch_layout_problem(input_size, branches)
        if problem:
            raise UserError(problem)
        self.in_channels = in_channels
        self.input_size = input_size
        self.num_classes = num_classes
        self.num_labels = max(num_classes, 0)  # rows of the label table, the null label's included
        self.detach_handed = detach_handed
        self.pos_embed_init = pos_embed_init
        self.branches = nn.ModuleList()
        handed_dim, prev_grid = None, None
        for index, spec in enumerate(branches):
            grid = input_size // spec.downsample // spec.patch_size
            ratio = 1 if prev_grid is None else grid // prev_grid
            try:
                branch = DiMRBranch(
                    in_channels, input_size, num_classes, norm=norm, handed_dim=handed_dim, upsample_ratio=ratio,
                    class_embedding=class_embedding,
                    **{f.name: getattr(spec, f.name) for f in fields(spec)},
                )
            except UserError as err:  # said of the branch it is about, not of the whole model section
                here = f"model.branches.{index}"
                if not (err.key_path or "").startswith("model."):  # a branch's own keys are relative to it
                    err.key_path = f"{here}.{err.key_path}" if err.key_path else here
                raise err from None
            self.branches.append(branch)
            handed_dim, prev_grid = branch.handed_dim, grid
        if time_blind(self, norm, *(getattr(spec.block, "keywords", {}).get("norm") for spec in branches)):
            raise UserError("with these norms no layer of the DiMR sees the time t (plain norms in every block and "
                            "branch)", key_path="model.norm",
                            suggestion="use td_rmsnorm or td_layernorm (DiMR's own), or adaln_zero")
        self._check_label_path(class_embedding)
        self.init_weights()
        self.set_grad_checkpointing(grad_checkpointing)

    def _check_label_path(self, class_embedding: bool) -> None:
        """The label reaches a DiMR through a Transformer branch's class token, or through
        ``class_embedding`` into the timestep embedding of embedding conditioners (adaLN-Zero):
        a class-conditional DiMR with neither, or a ``class_embedding`` nothing reads, is refused
        (label dropout and guidance would silently do nothing)."""
        embeds = [b for b in self.branches if getattr(b, "y_embedder", None) is not None]
        if class_embedding and not embeds:
            raise UserError("class_embedding adds the label to the timestep embedding of embedding conditioners "
                            "(adaln_zero); no norm of this DiMR uses one, so it would do nothing",
                            key_path="model.class_embedding", suggestion="drop class_embedding, or use adaln_zero norms")
        if self.num_classes > 1 and not embeds and all(b.class_embed is None for b in self.branches):
            raise UserError(f"model.num_classes is {self.num_classes}, but no layer of this DiMR sees the label: it "
                            "enters through a Transformer branch's class token or class_embedding with adaln_zero norms",
                            key_path="model.num_classes", suggestion="add a Transformer branch, set class_embedding: "
                            "true with adaln_zero norms, or num_classes: 1 for an unconditional model")

    @staticmethod
    def _check_branch(i: int, spec: BranchConfig | Mapping[str, Any]) -> BranchConfig:
        """A branch as :class:`BranchConfig` (Python callers may pass a plain mapping)."""
        if isinstance(spec, Mapping):
            names = {f.name for f in fields(BranchConfig)}
            if set(spec) - names:
                raise UserError(f"model.branches[{i}]: unknown keys {sorted(set(spec) - names)}; a branch takes {sorted(names)}")
            spec = BranchConfig(**spec)
        if not callable(spec.block):
            raise UserError(f"model.branches[{i}].block must be a block component such as {{type: convnext}}")
        for name in ("dim", "depth", "patch_size", "downsample", "head_kernel_size"):
            low = 0 if name == "depth" else 1  # depth 0 builds one block, as the official num_blocks 0 does
            if getattr(spec, name) < low:
                raise UserError(f"model.branches[{i}].{name} must be an integer of at least {low}, got "
                                f"{getattr(spec, name)}")
        return spec

    def init_weights(self) -> None:
        """Trunc-normal(0.02) Linear and Embedding weights, zero biases, PyTorch-default convs,
        position tables as ``pos_embed_init`` says, then each submodule's own ``init_weights``
        hook (e.g. adaLN-Zero's zero modulation)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for branch in self.branches:
            init_pos_embed_(branch.pos_embed, branch.grid, self.pos_embed_init)
        for m in self.modules():
            if m is not self and callable(getattr(m, "init_weights", None)):
                m.init_weights()

    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True) -> None:
        """Recompute block activations in backward (saves memory, costs one more forward of those
        blocks): in every branch, or per branch with one boolean each, lowest resolution first."""
        for branch, flag in zip(self.branches, branch_flags(enable, len(self.branches))):
            branch.blocks.grad_checkpointing = flag

    @property
    def grad_checkpointing(self) -> list[bool]:
        """Which branches recompute their block activations, lowest resolution first."""
        return [bool(branch.blocks.grad_checkpointing) for branch in self.branches]

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay: the time-dependent gates ``w``, ``b``."""
        return no_weight_decay_names(self)

    def forward_with_features(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """The outputs and every branch's handed-on features (including the last, which nothing reads)."""
        return self._run(x, t, y, last_features=True)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> list[Tensor]:
        return self._run(x, t, y, last_features=False)[0]

    def _run(self, x: Tensor, t: Tensor, y: Tensor | None, last_features: bool) -> tuple[list[Tensor], list[Tensor]]:
        check_inputs("DiMR", x, y, self.in_channels, self.input_size, self.num_labels, self.branches[0].patch_embed.weight)
        if y is None and self.num_classes > 0:  # unconditional: the null label (the last one)
            y = torch.full((x.shape[0],), self.num_classes - 1, dtype=torch.long, device=x.device)
        cond = Conditioning(t=as_time_vector(t, x.shape[0], x.device), y=y)
        outputs, features, handed = [], [], None
        for i, branch in enumerate(self.branches):
            hand_on = last_features or i + 1 < len(self.branches)
            out, handed = branch(x, cond, handed, hand_on)
            outputs.append(out)
            if handed is not None:
                features.append(handed)
                if self.detach_handed:
                    handed = handed.detach()
        return outputs, features

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, log_snr, y)`` on the model's device and dtype (works on ``meta``)."""
        p = self.branches[0].patch_embed.weight
        noise = torch.empty if p.device.type == "meta" else torch.randn  # randn on meta imports torch._dynamo
        x = noise(batch_size, self.in_channels, self.input_size, self.input_size, device=p.device, dtype=p.dtype)
        t = torch.full((batch_size,), 0.5, device=p.device, dtype=p.dtype)
        y = torch.zeros(batch_size, dtype=torch.long, device=p.device)
        return x, t, y
