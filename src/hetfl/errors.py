"""Errors a user can cause and fix. The command line prints their message as one line, no traceback."""


class HetflError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(HetflError):
    """An invalid configuration: the message names the key."""


class DataError(HetflError):
    """A missing or malformed data file: the message names the file and what was expected."""


class DivergedError(HetflError):
    """Training produced a non-finite loss or model."""
