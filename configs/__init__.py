"""Packaged YAML configs (the top-level configs/ folder), read with importlib.resources."""
