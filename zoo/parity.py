"""Parity against the official implementations: run a golden file through the zoo model.

A golden file (``tests/golden/*.pt``) holds the official constructor ``config``, its
``state_dict``, ``inputs`` and ``outputs``. We build the zoo model from the config, convert
and load the state dict strictly, run the forward and report the errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

import zoo
from zoo.weights import build_with_state
from zoo.convert import default_model_inputs, get_family, guess_family, infer_family, model_spec, unwrap_state_dict
from zoo.errors import UserError
from zoo.torchfile import torch_load_plain

TOLERANCE = 1e-4  # max abs error for parity to pass
EXPECTED = "config, state_dict, inputs and outputs (see tests/golden/README.md)"


@dataclass(frozen=True)
class ParityResult:
    """Errors of the zoo forward against the official outputs.

    ``max_rel`` is ``max_abs`` divided by the largest absolute official output (an element-wise
    ratio is meaningless where outputs cross zero). ``reference`` names the golden entry compared
    against: ``outputs_fp64`` for a float64 run of a file that holds it, else ``outputs``.
    """

    family: str
    max_abs: float
    max_rel: float
    reference: str = "outputs"

    @property
    def passed(self) -> bool:
        return self.max_abs <= TOLERANCE


def load_golden(path: str | Path) -> dict:
    """A golden file as a dict (``weights_only=True``); missing or malformed files are UserErrors."""
    try:
        golden = torch_load_plain(path, "golden file")
    except UserError as err:
        raise UserError(f"{err.message}; expected a golden file: a torch dict of {EXPECTED}") from None
    required = ("config", "state_dict", "inputs", "outputs")
    if not isinstance(golden, dict):
        raise UserError(f"{path} is not a golden file: it holds a {type(golden).__name__}, expected a dict with {EXPECTED}")
    missing = [k for k in required if k not in golden]
    if missing:
        if golden and all(isinstance(v, Tensor) for v in golden.values()):
            raise UserError(f"{path} is not a golden file but a state dict; expected a dict with {EXPECTED}")
        raise UserError(f"{path} is not a golden file: missing {', '.join(missing)} (expected a dict with {EXPECTED})")
    if not isinstance(golden["config"], dict) or not isinstance(golden["state_dict"], dict):
        raise UserError(f"{path} is not a golden file: config and state_dict must be dicts (expected {EXPECTED})")
    return golden


def build_official_model(family: str, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> nn.Module:
    """The zoo model for an official config, with the converted official weights loaded strictly."""
    converter = get_family(family)
    spec = model_spec(converter, config)
    converted = converter.convert_state_dict(state_dict, config)
    model = build_with_state(lambda: zoo.build_model({"model": spec}), converted, source=f"converted {family} state dict")
    return model.eval()


def _as_list(out: Any) -> list[Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def compare(actual: Any, expected: Any) -> tuple[float, float]:
    """Max abs error and max abs error relative to max |expected|, over tensors or lists of them."""
    actual, expected = _as_list(actual), _as_list(expected)
    if len(actual) != len(expected):
        raise UserError(f"the model returned {len(actual)} outputs, the golden file holds {len(expected)}")
    max_abs, scale = 0.0, 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            raise UserError(f"output shape {tuple(a.shape)} differs from the golden {tuple(e.shape)}")
        if not torch.isfinite(e).all():  # every error against it would read inf or NaN, naming no cause
            raise UserError("the golden file's expected outputs hold NaN or inf: there is nothing to compare with",
                            suggestion="write the golden file again from the official model")
        error = (a.to(e.dtype) - e).abs().max().item()
        max_abs = max(max_abs, error if math.isfinite(error) else math.inf)  # max(0.0, nan) is 0.0: NaN must fail
        scale = max(scale, e.abs().max().item())
    return max_abs, max_abs / scale if scale > 0 else max_abs


@torch.no_grad()
def run_parity(path: str | Path, family: str | None = None, dtype: torch.dtype = torch.float32) -> ParityResult:
    """Build, convert, run a golden file; ``dtype=torch.float64`` compares against ``outputs_fp64``
    where the file holds it (else against ``outputs``, as :attr:`ParityResult.reference` says)."""
    golden = load_golden(path)
    state = unwrap_state_dict(golden["state_dict"], f"{path}'s state_dict")  # a DDP or compiled model's prefixes
    looks = guess_family(state)
    if family is not None and looks not in (None, family):  # else its config keys read as unknown, naming no fix
        raise UserError(f"{path} holds {looks} weights, not {family} ones",
                        suggestion=f"pass --family {looks}, or leave --family out")
    family = family or infer_family(golden["config"], hint=Path(path).name)
    model = build_official_model(family, golden["config"], state).to(dtype)
    model_inputs = getattr(get_family(family), "model_inputs", default_model_inputs)
    try:
        inputs = model_inputs(golden["inputs"])
    except KeyError as err:
        raise UserError(f"{path} is not a {family} golden file: its inputs lack {err}") from None
    except (TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a {family} golden file: its inputs are not the mapping of tensors the "
                        f"family reads ({err})") from None
    args = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in inputs]
    reference = "outputs_fp64" if dtype == torch.float64 and "outputs_fp64" in golden else "outputs"
    expected = golden[reference]
    try:
        outputs = model(*args)
    except (UserError, IndexError, RuntimeError, ValueError) as err:  # e.g. a label past the table, 3 channels for 4
        raise UserError(f"{path}: its inputs do not fit the model its config builds "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    max_abs, max_rel = compare(outputs, expected)
    return ParityResult(family, max_abs, max_rel, reference)
