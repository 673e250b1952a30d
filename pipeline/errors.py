"""One exception type for every user-facing failure, so the CLI can print one line, never a traceback."""


class FerError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""
