"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest

from emalign.errors import EmalignError


def one_line_error(path, func, *args, match: str | None = None, **kwargs) -> str:
    """Call func, expect an EmalignError whose message is one line naming `path`; return the message."""
    with pytest.raises(EmalignError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message
