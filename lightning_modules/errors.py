"""The one error type that ``train.py`` and the command-line tools print as a single line."""


class UserFacingError(ValueError):
    """Bad input the user can fix; the message names the problem and the fix, so no traceback is shown."""
