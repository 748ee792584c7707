"""A plugin block any token backbone takes (a Transformer block subclass), declared by entry point only."""

from zoo.blocks.transformer import TransformerBlock


class PlugBlock(TransformerBlock):
    """A Transformer block from a plugin distribution (zoo-dit-block-plugin 0.3)."""
