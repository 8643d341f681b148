"""The one exception type users see: a clear sentence, no stack trace."""


class UserError(Exception):
    """Bad input or a bad bundle: the message names what is wrong and what to do.

    The CLI prints it as one line and exits non-zero; the Python API lets it propagate.
    """
