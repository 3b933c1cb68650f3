"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (paths, recipes, options). Never a bug: no traceback is shown."""
