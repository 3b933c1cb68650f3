"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


import errno
import os
import re

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class UserError(Exception):
    """Bad input from the user (paths, recipes, options). Never a bug: no traceback is shown.

    Always one line: a line break inside the message (a recipe key or value quoted from the user's input, a library
    message) is shown as an escaped `\\n`."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def out_of_space(exc: BaseException, where) -> UserError | None:
    """A UserError when `exc` says the disk (or a file size limit) is full while writing `where`, else None.
    safetensors reports I/O errors as its own exception carrying "(os error N)"."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in _DISK_FULL:
        return None
    return UserError(f"no space left while writing {where}: {os.strerror(code)}; free some space and run again")
