"""A byte range of a large zlib (Deflate) stream, decoded from the nearest decoder state saved on an earlier pass.

A TIFF page stored as one Deflate strip can only be decoded from its start; saving the decoder's state every
:data:`STATE_EVERY` decoded bytes lets a later read of any range start close to it, so that a range costs about its
own length (and the distance to the state before it) in time, and its own length in memory, whatever the strip's size.
"""

from __future__ import annotations

import bisect
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

STATE_EVERY = 2**24
"""Decoded bytes between two saved decoder states (each holds the 32 KiB Deflate window and some input)."""
STREAMS_KEPT = 8
"""Streams whose saved states are kept (the least recently read forgotten first)."""
PIECE_BYTES = 2**22
"""Decoded bytes handed on at a time."""
READ_BYTES = 2**14
"""Compressed bytes fed to the decoder at a time (a saved state keeps what it had not yet consumed)."""

_states: OrderedDict[Hashable, list[tuple[int, int, object]]] = OrderedDict()
_lock = threading.Lock()


def _start_afresh() -> None:
    """In a forked child: no saved states, and a lock no thread of the parent can hold."""
    global _lock
    _lock = threading.Lock()
    _states.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_start_afresh)


def _nearest_state(key: Hashable, start: int) -> tuple[int, int, object]:
    """(decoded offset, compressed offset, decoder) of the saved state of stream ``key`` last at or before ``start``,
    the stream's beginning if none; the decoder is a copy, free to advance."""
    with _lock:
        states = _states.setdefault(key, [(0, 0, zlib.decompressobj())])
        _states.move_to_end(key)
        while len(_states) > STREAMS_KEPT:
            _states.popitem(last=False)
        decoded, consumed, decoder = states[bisect.bisect_right(states, start, key=lambda s: s[0]) - 1]
        return decoded, consumed, decoder.copy()


def _save_state(key: Hashable, decoded: int, consumed: int, decoder: object) -> None:
    with _lock:
        states = _states.get(key)
        if states is not None and decoded not in (s[0] for s in states):
            bisect.insort(states, (decoded, consumed, decoder.copy()), key=lambda s: s[0])


def inflate_range(
    read: Callable[[int, int], bytes], length: int, key: Hashable, start: int, stop: int
) -> Iterator[bytes]:
    """Decoded bytes ``[start, stop)`` of the zlib stream of ``length`` compressed bytes that ``read(offset, size)``
    returns, in consecutive pieces of about :data:`PIECE_BYTES`; ``key`` names the stream (and its version) for the
    saved states. Raises ``OSError`` when the stream ends before ``stop`` or is corrupt."""
    decoded, consumed, decoder = _nearest_state(key, start)
    pieces, size, pending = [], 0, b""
    while decoded < stop:
        if not pending:
            if consumed >= length:
                raise OSError(f"a compressed strip ends after {decoded} of at least {stop} bytes")
            pending = read(consumed, min(READ_BYTES, length - consumed))
            if not pending:
                raise OSError("the file ends inside a compressed strip")
        fed = len(pending)
        boundary = (decoded // STATE_EVERY + 1) * STATE_EVERY
        try:
            piece = decoder.decompress(pending, min(stop, boundary) - decoded)
        except zlib.error as exc:
            raise OSError(f"corrupt Deflate data ({exc})") from exc
        pending = decoder.unconsumed_tail
        consumed += fed - len(pending)
        if decoded + len(piece) > start:
            pieces.append(piece[max(start - decoded, 0) :])
            size += len(pieces[-1])
        decoded += len(piece)
        if decoded == boundary:
            _save_state(key, decoded, consumed, decoder)
        if decoder.eof and decoded < stop:
            raise OSError(f"a compressed strip holds {decoded} bytes, fewer than {stop}")
        if size >= PIECE_BYTES or decoded >= stop:
            yield b"".join(pieces)
            pieces, size = [], 0
