"""The error a bad configuration raises, in a module of its own so that any module can raise it
without importing the config (megamom.parallel.layout checks configs that megamom.config builds)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""
