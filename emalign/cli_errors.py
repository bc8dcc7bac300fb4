"""One-line errors for the click commands: bad input and refused writes end with ``error: ...``, exit 2."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from pathlib import Path

import click

from emalign.errors import EmalignError

_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""OSError numbers that say the output location cannot take the writes (full, read-only, no permission)."""


def _os_error_line(err: OSError, output: str | None) -> str | None:
    """One line for a write that the file system refused, naming OUT; None for any other OSError (a bug)."""
    if err.errno not in _UNWRITABLE:
        return None
    name = os.fsdecode(err.filename) if err.filename is not None else None
    name = re.sub(r"\.[0-9a-f]{32}\.partial$", "", name) if name else name  # zarr writes via a temporary file
    if output is None or (name is not None and not Path(name).resolve().is_relative_to(Path(output).resolve())):
        return f"{name or output}: {err.strerror}"
    inside = f" (writing {Path(name).resolve().relative_to(Path(output).resolve())})" if name else ""
    return f"{output}: {err.strerror}{inside}; the output is incomplete: fix that and run the same command to resume"


def friendly(func):
    """Turn EmalignError (bad input) and refused writes (disk full, read-only) into one line on stderr, exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EmalignError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            line = _os_error_line(err, kwargs.get("output_path"))
            if line is None:
                raise
            click.echo(f"error: {' '.join(line.split())}", err=True)
            sys.exit(2)

    return wrapper
