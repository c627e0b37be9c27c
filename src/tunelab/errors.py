"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class TunelabError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class DataError(TunelabError):
    """Bad data: the message names the file, line or record, field and what was expected."""


class MethodUnavailableError(TunelabError):
    """A tuning method that cannot run here (e.g. 4-bit without bitsandbytes support), found before loading."""
