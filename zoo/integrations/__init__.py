"""zoo models in other libraries' conventions: timm (``zoo.integrations.timm``) and diffusers
(``zoo.integrations.diffusers``).

Importing this package imports neither library; each submodule imports its own when imported.
"""
