"""matplotlib as zoo uses it: the Agg backend (files only, no display), without its config-directory chatter."""

from __future__ import annotations

import logging
from types import ModuleType

#: What matplotlib logs when the user's config directory cannot be written (a read-only HOME): it then
#: works from a temporary one, and zoo reads no matplotlib configuration, so the lines say nothing to act on.
_CONFIG_DIR_NOTES = ("mkdir -p failed for path", "Matplotlib created a temporary cache directory")


class _WithoutConfigDirNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith(_CONFIG_DIR_NOTES) or msg.endswith("is not a writable directory"))


def agg_matplotlib() -> ModuleType:
    """``matplotlib`` set to the Agg backend, imported without the config-directory warnings."""
    logger = logging.getLogger("matplotlib")
    if not any(isinstance(f, _WithoutConfigDirNotes) for f in logger.filters):
        logger.addFilter(_WithoutConfigDirNotes())
    import matplotlib

    matplotlib.use("Agg")
    return matplotlib
