"""A plugin that cannot be imported: its dependency is missing."""

raise ImportError("zoo_broken_plugin needs the package 'frobnicate', which is not installed")
