"""Errors that carry a message meant for the user (CLI prints it on one line, the API turns it into a 4xx)."""


class BlendRAGError(Exception):
    """Base class: a problem with the user's input or data, reported without a stack trace."""


class CorruptEntry(BlendRAGError):
    """A stored KV entry failed its checksum or could not be parsed; it is dropped and recomputed."""
