"""A plugin package re-exporting its classes: its entry points name ``zoo_reexp_plugin:CLASS``."""

from .blocks import PlainBlock, ReexpBlock

__all__ = ["PlainBlock", "ReexpBlock"]
