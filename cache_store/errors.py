"""Refusals of the cache layer; the message says what is wrong and what to do."""


class CacheError(Exception):
    """A cache is missing, incomplete, corrupted, or not the one the caller asked for."""
