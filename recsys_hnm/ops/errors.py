"""The package's config error, defined at the bottom so that any stage may raise it."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""
