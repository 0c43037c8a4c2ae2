"""The one base class of mistakes a user can fix: the job says what is wrong, with no traceback."""


class UserError(Exception):
    """A configuration or input problem; its message names the key or file and the fix."""
