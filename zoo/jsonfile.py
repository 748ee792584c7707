"""Reading the JSON files zoo writes (checkpoint configs, latent plans and manifests) with errors for people.

A file cut short by a full disk or an interrupted copy, or edited by hand, is one line naming
the file and what to do, not a ``JSONDecodeError`` traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError


def read_json_object(path: str | Path, what: str, suggestion: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read, is not JSON or holds anything but an
    object raises a :class:`UserError` naming ``what`` the file is (e.g. "latent manifest")."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read the {what} {path}: {err.strerror or err}", suggestion=suggestion) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"the {what} {path} is not valid JSON ({err})", suggestion=suggestion) from None
    if not isinstance(payload, dict):
        raise UserError(f"the {what} {path} is not a JSON object (it holds a {type(payload).__name__})",
                        suggestion=suggestion)
    return payload
