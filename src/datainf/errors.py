"""The errors datainf raises: each message says what was wrong, where, and what to do."""


class DataInfError(ValueError):
    """Bad input or state that datainf refuses to work from; the message names problem and fix."""
