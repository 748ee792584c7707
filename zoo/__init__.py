"""zoo: a registry-driven architecture zoo for diffusion backbones (DiMR, U-ViT, DiT).

``import zoo`` is cheap (no torch); components are imported when a recipe names them.
"""

from .api import build_component, build_model, from_checkpoint, get_component, load_recipe, register
from .errors import UserError

__all__ = ["build_component", "build_model", "from_checkpoint", "get_component", "load_recipe", "register",
           "UserError"]
