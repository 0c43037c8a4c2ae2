"""The one base class of mistakes a user can fix (the job says what is wrong, with no traceback),
and how one item's failure is written in its row."""


class UserError(Exception):
    """A configuration or input problem; its message names the key or file and the fix."""


def error_type(message: str) -> str:
    """'CorruptExif: ...' -> 'CorruptExif'."""
    return message.split(":", 1)[0]


def describe_error(error: BaseException) -> str:
    """Short 'Type: message' for the error column."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:500]
