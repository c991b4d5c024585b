"""Errors raised by the data modules (both name the offending path)."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not where it was looked for; the message lists every location tried and how to get it."""


class CorruptImageError(OSError):
    """An image file cannot be decoded; the message names the file."""
