"""Exceptions raised by ichpro: each message names what is wrong, where, and how to fix it."""


class IchproError(Exception):
    """Base class of every error ichpro raises on bad input or configuration."""


class ManifestError(IchproError):
    """A manifest (CSV of patients) is malformed; the message lists every problem found."""


class CohortSpecError(IchproError):
    """A synthetic cohort specification is invalid."""


class ImageError(IchproError):
    """A CT volume cannot be read or is not usable (empty, NaN, a single slice, not a volume)."""
