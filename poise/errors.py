"""Exceptions poise raises for problems the user can fix.

Every message is a short paragraph meant for the user: what is wrong, where (file, line, field),
and what to do about it.
"""

from __future__ import annotations


class PoiseError(Exception):
    """Base class of poise's user-facing errors; the message explains the problem and the fix."""


class DataError(PoiseError, ValueError):
    """The training data cannot be used as it is (bad file, bad row, missing column, ...)."""


class ConfigError(PoiseError, ValueError):
    """A setting is missing, unknown or out of range."""


class LaunchError(ConfigError):
    """The processes were not started as the config asks (a launch form that would silently run something
    else, or a process whose peers never came); the message says what to run instead."""


class NonFiniteError(PoiseError):
    """A non-finite loss or gradient stopped training (a checkpoint of the last good weights is kept)."""
