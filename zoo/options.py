"""How a message of code several commands share names the caller's options: zoo eval's and zoo sample's
flags (``--ref``, ``--batch-size``, ``--vae``) or zoo train's recipe keys (``--set train.eval_ref=...``).

Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommandOptions:
    """What messages of code several commands share call the caller's options: zoo eval's flags (the
    default; zoo sample's have the same names), or zoo train's recipe keys (its train.eval_every, its
    sample grids). A message names only what the command that prints it takes."""

    ref: str = "--ref"
    extractor: str = "--extractor"
    extractor_weights: str | None = "--extractor-weights"  # None: Inception's weights come from $ZOO_INCEPTION_WEIGHTS
    batch_size: str = "--batch-size"  # images per sampling batch
    vae: str = "--vae"  # the VAE a latent model decodes with
    recipe_keys: bool = False  # given as --set KEY=VALUE

    def given(self, option: str, value: object) -> str:
        """``option`` (``"ref"``, ``"extractor"``, ``"batch_size"``, ``"vae"``) set to ``value``: ``--ref emoji32``
        or ``--set train.eval_ref=emoji32``."""
        name = getattr(self, option)
        return f"--set {name}={value}" if self.recipe_keys else f"{name} {value}"

    @property
    def inception_weights(self) -> str:
        """How the caller is given Inception's weights file (follows the choice of inception)."""
        from zoo.eval.extractors import INCEPTION_ENV, INCEPTION_FILE

        if self.extractor_weights is None:
            return f"with {INCEPTION_ENV}=/path/to/{INCEPTION_FILE} in the environment"
        return f"{self.extractor_weights} {INCEPTION_FILE}"


EVAL_OPTIONS = CommandOptions()
TRAIN_OPTIONS = CommandOptions("train.eval_ref", "train.eval_extractor", extractor_weights=None,
                               batch_size="sample.batch_size", vae="data.vae", recipe_keys=True)
