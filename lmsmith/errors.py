"""The one exception type users see.

Anything raised as `LmsmithError` is a problem with the user's input (a path, a
config, a file's contents). Its message is one line that names the thing and
the fix; the CLI prints it without a traceback and exits with status 1.
"""


class LmsmithError(Exception):
    """A user-facing error: the message names the file/value and how to fix it."""
