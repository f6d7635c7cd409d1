"""The one error type that ``train.py`` and every command-line tool print as a single line."""


class UserFacingError(ValueError):
    """Bad input the user can fix; the message names the problem and the fix, so no traceback is shown.

    It subclasses ``ValueError`` so that code catching the standard type for bad values keeps working;
    every project error a user can cause (a corrupt checkpoint, an unknown task, an unreachable budget,
    a bad argument) derives from it, and the entry points print it as ``error: <message>``.
    """
