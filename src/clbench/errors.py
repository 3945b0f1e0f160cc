"""Errors that clbench reports to the user as one clear line (exit code 2), before any training."""


class ConfigError(ValueError):
    """A configuration value is unknown, out of range or inconsistent; the message names the key."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""
