"""The block itself, also registered with the decorator (so it works without being installed)."""

import zoo
from zoo.blocks.transformer import TransformerBlock


@zoo.register("block", "reexp_block")
class ReexpBlock(TransformerBlock):
    """A Transformer block registered both by an entry point and by the decorator."""


class PlainBlock:
    """Registered by entry point only, and no nn.Module (zoo refuses it by name)."""

    def __init__(self, dim, num_heads=1, mlp_ratio=4.0, norm=None, mlp=None, cond_dim=None, qkv_bias=True):
        self.dim = dim
