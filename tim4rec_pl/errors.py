"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (file, column, config value) that the user can fix.

    The message is one line: what is wrong, where, and how to fix it.
    """
