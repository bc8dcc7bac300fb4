"""Byte ranges of a zlib stream, decoded from saved decoder states."""

import zlib

import numpy as np
import pytest

from emalign import inflate


@pytest.fixture
def small_states(monkeypatch):
    monkeypatch.setattr(inflate, "STATE_EVERY", 1000)
    monkeypatch.setattr(inflate, "READ_BYTES", 64)
    monkeypatch.setattr(inflate, "PIECE_BYTES", 300)
    monkeypatch.setattr(inflate, "_states", type(inflate._states)())


def reader(compressed: bytes, reads: list[int]):
    def read(offset: int, size: int) -> bytes:
        reads.append(size)
        return compressed[offset : offset + size]

    return read


def test_any_range_is_that_slice_of_the_stream_decoded_from_the_state_before_it(small_states):
    plain = np.random.default_rng(1).integers(0, 255, 20000, dtype=np.uint8).tobytes()
    compressed = zlib.compress(plain)
    reads = []
    read = reader(compressed, reads)
    assert b"".join(inflate.inflate_range(read, len(compressed), "s", 0, len(plain))) == plain  # saves every 1000
    for start, stop in [(0, 1), (999, 1001), (12345, 12400), (19990, 20000), (5000, 5000)]:
        reads.clear()
        assert b"".join(inflate.inflate_range(read, len(compressed), "s", start, stop)) == plain[start:stop]
        assert sum(reads) <= (stop - start) + 1000 + 64  # incompressible: a byte read per byte decoded


def test_a_stream_that_ends_early_or_is_corrupt_raises_oserror(small_states):
    compressed = zlib.compress(bytes(range(256)) * 20)
    with pytest.raises(OSError, match="holds 5120 bytes, fewer than 6000"):
        list(inflate.inflate_range(reader(compressed, []), len(compressed), "a", 0, 6000))
    with pytest.raises(OSError, match="ends after"):
        list(inflate.inflate_range(reader(compressed[:40], []), 40, "b", 0, 5000))
    damaged = compressed[:10] + bytes(30) + compressed[40:]
    with pytest.raises(OSError, match="corrupt Deflate data"):
        list(inflate.inflate_range(reader(damaged, []), len(damaged), "c", 0, 5000))
