"""Read EM stacks lazily (Zarr v2/v3, OME-Zarr, TIFF stack, folder of TIFFs) and write aligned OME-Zarr.

Arrays are (z, y, x). Bad input raises `EmalignError` with a one-line message naming the path and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import dask.array as da
import numcodecs
import numpy as np
import tifffile
import zarr
from tqdm import tqdm
from zarr.codecs import BloscCodec

from emalign import stores
from emalign.downsample import block_mean
from emalign.errors import EmalignError, IncompleteOutputWarning
from emalign.inflate import inflate_range
from emalign.layout import NGFF_VERSIONS, SHARD_XY
from emalign.ngff import AXES, image_attrs

COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
COMPRESSOR_V3 = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
"""COMPRESSOR for Zarr v3 arrays."""
SECTION_CHUNKS = (1, 512, 512)
PYRAMID_TOP = 256  # auto pyramids stop once the smaller side of a level is at most this many pixels
WRITE_TILE = 2048
"""Side (px) of the level-0 tiles an unsharded output is written in (sharded: one shard per tile)."""
DASK_XY = 4096  # y/x extent that dask chunks over a Zarr array grow to (whole multiples of the Zarr chunks)
MAX_ABS_VALUE = 1e12  # largest pixel magnitude accepted for alignment (the engine sums squares in float32)
_TIFF_SUFFIXES = (".tif", ".tiff")
_UNITS = {
    "nm": "nanometer",
    "nanometer": "nanometer",
    "nanometers": "nanometer",
    "um": "micrometer",
    "\u00b5m": "micrometer",
    "\u03bcm": "micrometer",
    "\\u00b5m": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
}


@dataclass
class Stack:
    """A lazily read (z, y, x) stack: `data` is a dask array, nothing is read until it is computed."""

    data: da.Array
    path: str
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str = "nanometer"
    level: int = 0
    locate: Callable[[int], str] | None = None
    """Names the file or the damaged chunk(s) of section z, for read errors (a picklable callable, or None)."""
    voxel_known: bool = False
    """True when `voxel_size` and `unit` come from the file's metadata (False: defaults)."""
    read_part: Callable[[int, slice, slice], np.ndarray] | None = None
    """``read_part(z, rows, cols)``: that part of section z, reading only the Zarr chunks or TIFF strips and tiles it
    covers (`data`'s dask chunks are read whole); None: parts are cut from `data`."""
    layout: str = ""
    """How the sections were gathered when not as one series of equal pages (a file's pages of several series,
    sections of several sizes centred on a canvas), said when a run starts; empty otherwise."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


def _err(path: str | os.PathLike, problem: str) -> EmalignError:
    """The EmalignError for `path`, its message forced onto one line."""
    return EmalignError(" ".join(f"{path}: {problem}".split()))


def _reason(exc: BaseException) -> str:
    """A short one-line description of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class _TiffLog(logging.Filter):
    """Keeps tifffile's log records (warnings about damaged files) off stderr in threads reading through emalign."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        messages = getattr(self.local, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_TiffLog())


@contextlib.contextmanager
def _tiff_messages() -> Iterator[list[str]]:
    """Collect (instead of print) what tifffile logs in this thread inside the block."""
    outer = getattr(_TiffLog.local, "messages", None)
    _TiffLog.local.messages = messages = []
    try:
        yield messages
    finally:
        _TiffLog.local.messages = outer


def _natural_key(path: Path) -> list[Any]:
    """Sort key that puts 'img2' before 'img10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name.lower())]


def _os_reason(exc: OSError) -> str:
    """`No space left on device` style text of an OSError (the file it concerns left out)."""
    return exc.strerror or _reason(exc)


def check_writable(path: str | os.PathLike) -> None:
    """Raise EmalignError unless a file can be created (and removed) in the existing folder (or URL) `path`."""
    if stores.is_url(path):
        stores.check_writable(path)
        return
    probe = Path(path) / f".emalign-write-test-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _err(path, f"cannot write the output here ({_os_reason(exc)})") from exc


def _kept_axes(path: str, shape: Sequence[int], dtype: Any, names: Sequence[str] | None = None) -> list[int]:
    """Check dtype, dimensionality and size; return the axes forming (Z, Y, X) once singleton axes are dropped."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if dtype.kind not in "uif":
        raise _err(path, f"has dtype {dtype}; expected a numeric image (uint8, uint16, int or float)")
    keep = list(range(len(shape)))
    for axis, name in enumerate(names or ()):
        if name not in ("z", "y", "x"):
            if shape[axis] != 1:
                raise _err(path, f"has a {name!r} axis of length {shape[axis]} (shape {shape}); expected one channel")
            keep.remove(axis)
    while len(keep) > 3 and any(shape[axis] == 1 for axis in keep):
        keep.remove(next(axis for axis in keep if shape[axis] == 1))
    if len(keep) == 2:
        raise _err(path, f"is 2D (Y, X) with shape {shape}; expected a 3D stack (Z, Y, X)")
    if len(keep) > 3:
        raise _err(path, f"has shape {shape} with more than one channel; expected a 3D stack (Z, Y, X)")
    if len(keep) < 3:
        raise _err(path, f"is {len(keep)}D with shape {shape}; expected a 3D stack (Z, Y, X)")
    if 0 in shape:
        raise _err(path, f"is empty (shape {shape})")
    return keep


def _sections(
    reader: Callable[[int, slice, slice], np.ndarray],
    shape: tuple[int, int, int],
    dtype: np.dtype,
    chunks: tuple[int, int] | None = None,
) -> da.Array:
    """A dask array of ``shape`` (z, y, x) in chunks of one section by ``chunks`` (y, x; default whole sections), the
    chunk at (z, rows, cols) read by ``reader(z, rows, cols)`` (picklable for distributed)."""
    chunks = chunks or shape[1:]
    return da.map_blocks(
        functools.partial(_section_block, reader, shape[1:], chunks),
        chunks=da.core.normalize_chunks((1, *chunks), shape),
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype),
    )


def _section_block(
    reader: Callable[[int, slice, slice], np.ndarray],
    shape: tuple[int, int],
    chunks: tuple[int, int],
    block_id: tuple[int, int, int],
) -> np.ndarray:
    z, *index = block_id
    rows, cols = (slice(i * c, min(s, (i + 1) * c)) for i, c, s in zip(index, chunks, shape, strict=True))
    return reader(z, rows, cols)[None]


def _read_chunks(pieces: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """(y, x) of the dask chunks over sections of ``shape`` stored in ``pieces`` (rows, cols: TIFF tiles or strips;
    (1, 1) for uncompressed data read in place): whole pieces, about :data:`DASK_XY` on a side, and for strips as
    wide as the section bands of whole strips of about ``DASK_XY^2`` px (a strip is decoded whole)."""
    rows, cols = pieces
    if cols >= shape[1]:
        return min(shape[0], rows * max(1, DASK_XY * DASK_XY // (rows * shape[1]))), shape[1]
    return min(shape[0], rows * max(1, DASK_XY // rows)), min(shape[1], cols * max(1, DASK_XY // cols))


def _read_raw_region(
    path: str, offset: int, dtype: np.dtype, shape: tuple[int, int], z: int, rows: slice, cols: slice
) -> np.ndarray:
    """Part (rows, cols) of section z of uncompressed contiguous (z, y, x) image data of sections ``shape`` starting
    at byte ``offset`` (any byte order), memory-mapped: only that part is read."""
    start = offset + z * shape[0] * shape[1] * dtype.itemsize
    if os.path.getsize(path) < start + shape[0] * shape[1] * dtype.itemsize:
        raise OSError(f"file ends inside section {z}")
    mapped = np.memmap(path, dtype, "r", start, shape)
    return np.array(mapped[rows, cols], dtype.newbyteorder("="))


TIFF_FILES_OPEN = 4
"""TIFF files each thread keeps open between reads (a multi-page file's pages are parsed once per thread)."""
_open_tiffs = threading.local()


def _tiff_file(path: str) -> tifffile.TiffFile:
    """``path`` opened for this thread of this process, kept open for its next reads while the file's size and
    modification time stay the same (a forked process, which would share its parent's file offsets, opens its own)."""
    pid, files = getattr(_open_tiffs, "files", (None, {}))
    if pid != os.getpid():
        files = {}
        _open_tiffs.files = (os.getpid(), files)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    tif = files.pop(key, None)
    files[key] = tif = tifffile.TiffFile(path) if tif is None else tif  # the most recently used last
    if len(files) > TIFF_FILES_OPEN:
        files.pop(next(iter(files))).close()
    return tif


INFLATED_STRIP_BYTES = 2**24
"""Deflate strips that decode to more than this are read by their rows (:func:`emalign.inflate.inflate_range`)."""
_DEFLATE = (8, 32946)  # TIFF compression codes of zlib streams (Adobe Deflate, Deflate)


def _page_file(page: tifffile.TiffPage) -> tifffile.FileHandle:
    """The open handle of the file that holds ``page`` (tifffile closes a multi-file OME-TIFF's other files once
    their pages are parsed; reopened here, they stay open with the first file)."""
    handle = page.parent.filehandle
    if handle.closed:
        handle.open()
    return handle


def _inflated_by_rows(keyframe: tifffile.TiffPage) -> bool:
    """Whether a page's strips are large Deflate streams whose rows are decoded alone (no predictor, or horizontal
    differencing of integer samples, which undoes row by row)."""
    height, width = keyframe.chunks
    return (
        keyframe.compression in _DEFLATE
        and keyframe.chunked[1] == 1
        and keyframe.fillorder == 1
        and keyframe.bitspersample == 8 * keyframe.dtype.itemsize
        and (keyframe.predictor == 1 or (keyframe.predictor == 2 and keyframe.dtype.kind in "iu"))
        and height * width * keyframe.dtype.itemsize > INFLATED_STRIP_BYTES
    )


def _read_inflated_rows(page: tifffile.TiffPage, rows: slice, cols: slice) -> np.ndarray:
    """Part (rows, cols) of a page of large Deflate strips (:func:`_inflated_by_rows`): only its rows are decoded,
    from the strips' saved decoder states, a few MiB at a time."""
    keyframe, handle = page.keyframe, _page_file(page)
    (height, width), dtype = keyframe.chunks, keyframe.dtype.newbyteorder(page.parent.byteorder)
    row_bytes, stat = width * dtype.itemsize, os.fstat(handle.fileno())
    out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), keyframe.dtype)
    for strip in range(rows.start // height, -(-rows.stop // height)):
        offset, length, y0 = page.dataoffsets[strip], page.databytecounts[strip], strip * height
        if not length:  # a strip never written reads as 0
            continue

        def read(at: int, size: int, offset: int = offset) -> bytes:
            handle.seek(offset + at)
            return handle.read(size)

        key = (handle.path, stat.st_size, stat.st_mtime_ns, offset)
        row, stop, carry = max(rows.start, y0), min(rows.stop, y0 + height), b""
        for piece in inflate_range(read, length, key, (row - y0) * row_bytes, (stop - y0) * row_bytes):
            data, count = carry + piece, (len(carry) + len(piece)) // row_bytes
            band = np.frombuffer(data, dtype, count * width).reshape(count, width)
            if keyframe.predictor == 2:
                band = np.cumsum(band, axis=1, dtype=keyframe.dtype)
            out[row - rows.start : row - rows.start + count] = band[:, cols]
            row, carry = row + count, data[count * row_bytes :]
    return out


def _read_page_region(path: str, level: int, z: int, rows: slice, cols: slice) -> np.ndarray:
    """Part (rows, cols) of page z of series 0's pyramid ``level`` of TIFF ``path`` (:func:`_read_page_part`)."""
    with _tiff_messages():
        return _read_page_part(_tiff_file(path).series[0].levels[level].pages[z], rows, cols)


def _read_page_part(page: tifffile.TiffPage, rows: slice, cols: slice) -> np.ndarray:
    """Part (rows, cols) of ``page``, a 2D single-sample page, from the file that holds it (a multi-file OME-TIFF's
    pages are in several): only the strips or tiles it covers are read and decoded (an uncompressed contiguous page:
    only the part, mapped; large Deflate strips: only the part's rows)."""
    keyframe, handle = page.keyframe, _page_file(page)
    if page.is_contiguous:
        dtype = keyframe.dtype.newbyteorder(page.parent.byteorder)
        return _read_raw_region(handle.path, page.dataoffsets[0], dtype, keyframe.shape, 0, rows, cols)
    if _inflated_by_rows(keyframe):
        return _read_inflated_rows(page, rows, cols)
    out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), keyframe.dtype)
    (height, width), (across, down) = keyframe.chunks, keyframe.chunked[::-1]
    for row, col in itertools.product(
        range(rows.start // height, min(down, -(-rows.stop // height))),
        range(cols.start // width, min(across, -(-cols.stop // width))),
    ):
        index = row * across + col
        data = None
        if page.databytecounts[index]:  # a tile never written reads as 0
            handle.seek(page.dataoffsets[index])
            data = handle.read(page.databytecounts[index])
        piece, (*_, y0, x0, _), _ = keyframe.decode(
            data, index, jpegtables=page.jpegtables, jpegheader=keyframe.jpegheader
        )
        if piece is None:
            continue
        piece = piece.reshape(piece.shape[-3:-1])
        ys = slice(max(y0, rows.start), min(y0 + piece.shape[0], rows.stop))
        xs = slice(max(x0, cols.start), min(x0 + piece.shape[1], cols.stop))
        out[ys.start - rows.start : ys.stop - rows.start, xs.start - cols.start : xs.stop - cols.start] = piece[
            ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0
        ]
    return out


def _read_tiff_section(
    path: str, level: int, lead: tuple[int, ...], shape: tuple[int, int], z: int, rows: slice, cols: slice
) -> np.ndarray:
    """Part (rows, cols) of section z of a TIFF series whose sections are not one plain page each (``lead``: indices
    of dropped singleton axes before Z): the section is decoded whole."""
    with _tiff_messages():
        return tifffile.imread(path, series=0, level=level, selection=(*lead, z)).reshape(shape)[rows, cols]


def _read_placed_page(
    pages: tuple[tuple[str, int], ...],
    shapes: tuple[tuple[int, int], ...],
    canvas: tuple[int, int],
    z: int,
    rows: slice,
    cols: slice,
) -> np.ndarray:
    """Part (rows, cols) of section z of a stack of single TIFF pages, ``pages[z]`` (file, index of the page in the
    file's chain) of shape ``shapes[z]`` centred on a ``canvas`` (y, x) whose margins read as 0 (no data)."""
    (height, width), (dy, dx) = shapes[z], ((c - s) // 2 for c, s in zip(canvas, shapes[z], strict=True))
    ys = slice(max(rows.start - dy, 0), min(rows.stop - dy, height))
    xs = slice(max(cols.start - dx, 0), min(cols.stop - dx, width))
    with _tiff_messages():
        page = _tiff_file(pages[z][0]).pages[pages[z][1]]
        if shapes[z] == canvas:
            return _read_page_part(page, rows, cols)
        out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), page.keyframe.dtype)
        if ys.start < ys.stop and xs.start < xs.stop:
            out[
                ys.start + dy - rows.start : ys.stop + dy - rows.start,
                xs.start + dx - cols.start : xs.stop + dx - cols.start,
            ] = _read_page_part(page, ys, xs)
        return out


def _page_name(pages: tuple[tuple[str, int], ...], z: int) -> str:
    """Where section z of a stack of single TIFF pages is: the file's name, and the page's index when not 0."""
    path, index = pages[z]
    return f"{Path(path).name}, page {index}" if index else Path(path).name


def _page_pieces(keyframe: tifffile.TiffPage) -> tuple[int, int]:
    """(rows, cols) of the pieces a plain 2D single-sample page is read in: its strips or tiles, rows of large Deflate
    strips, (1, 1) when uncompressed and contiguous (any part read alone)."""
    if keyframe.is_contiguous:
        return 1, 1
    return (1, keyframe.chunks[1]) if _inflated_by_rows(keyframe) else tuple(keyframe.chunks)


def _is_plain(keyframe: tifffile.TiffPage) -> bool:
    """Whether a page is one 2D single-sample image (that :func:`_read_page_part` reads in parts)."""
    return keyframe.samplesperpixel == 1 and keyframe.imagedepth == 1 and len(keyframe.chunked) == 2


def _pieces(level: tifffile.TiffPageSeries) -> tuple[int, int] | None:
    """:func:`_page_pieces` of a series level's pages when each is one plain section, else None."""
    keyframe = level.keyframe
    if not _is_plain(keyframe) or keyframe.shape != tuple(level.shape[-2:]):
        return None
    return _page_pieces(keyframe) if len(level.pages) == math.prod(level.shape[:-2]) else None


def _section_pages(tif: tifffile.TiffFile) -> tuple[list[tifffile.TiffPage], int] | None:
    """When series 0 of a multi-page TIFF does not hold all its sections (pages written one at a time are each a
    series; pages of several sizes make several series): every plain page of series 0's type more than half the
    largest's height and width, in file order, and how many other pages are left out (thumbnails and unmarked
    pyramid levels, colour, other types); None when series 0 holds them all."""
    if len(tif.series) < 2:
        return None
    dtype, candidates, others = tif.series[0].dtype, [], 0
    for page in (page for series in tif.series for page in series.pages if page is not None):
        if _is_plain(page.keyframe) and page.keyframe.dtype == dtype:
            candidates.append(page)
        else:
            others += 1
    if not candidates:
        return None
    height, width = (max(page.keyframe.shape[axis] for page in candidates) for axis in (0, 1))
    sections = [
        page for page in candidates if 2 * page.keyframe.shape[0] > height and 2 * page.keyframe.shape[1] > width
    ]
    if len(sections) <= len(tif.series[0].pages):
        return None
    return sorted(sections, key=lambda page: page.index), others + len(candidates) - len(sections)


class _TiffHeader(NamedTuple):
    levels: list[tuple[tuple[int, ...], np.dtype, int | None, tuple[int, int] | None]]
    """Per pyramid level of series 0: shape, dtype, contiguous data offset or None, :func:`_pieces`."""
    byteorder: str
    voxel_size: tuple[float, float, float]
    unit: str
    voxel_known: bool
    """Whether the voxel size and unit come from the file (ImageJ calibration)."""
    first_page: int
    """Index of series 0's first page in the file's chain."""
    pages: list[tuple[int, tuple[int, int], tuple[int, int]]] | None
    """Index, shape and :func:`_page_pieces` of each section page when series 0 does not hold them all
    (:func:`_section_pages`), else None."""
    pages_note: str
    """How ``pages`` were gathered, when given."""


def _tiff_header(path: Path) -> _TiffHeader:
    """What the stages need of a TIFF, from its header only."""
    try:
        with _tiff_messages() as messages, tifffile.TiffFile(path) as tif:
            levels = [(s.shape, s.dtype.newbyteorder("="), s.dataoffset, _pieces(s)) for s in tif.series[0].levels]
            damaged = [m for m in messages if "failed" in m]  # e.g. "shaped series failed to reshape": pages lost
            if damaged:
                raise _err(path, f"is truncated or damaged (tifffile: {re.sub(r'^<[^>]*> *', '', damaged[0])[:200]})")
            found, pages, note = _section_pages(tif), None, ""
            if found is not None:
                sections, left_out = found
                pages = [(page.index, page.keyframe.shape, _page_pieces(page.keyframe)) for page in sections]
                note = f"its {len(pages)} pages in {len(tif.series)} series taken as the sections, in file order"
                note += f"; {left_out} other page(s) left out (thumbnails, colour or another type)" if left_out else ""
            imagej = tif.imagej_metadata or {}
            unit = _UNITS.get(str(imagej.get("unit", "")).strip().lower())
            xres, yres = tif.pages[0].resolution
            voxel, known = ((1.0, 1.0, 1.0), "nanometer"), False
            if unit and xres > 0 and yres > 0:
                voxel, known = ((float(imagej.get("spacing", 1.0)), 1 / yres, 1 / xres), unit), True
            first = tif.series[0].levels[0].pages[0].index
            return _TiffHeader(levels, tif.byteorder, *voxel, known, first, pages, note)
    except EmalignError:
        raise
    except Exception as exc:
        raise _err(path, f"is not a recognised stack (not a readable TIFF: {_reason(exc)})") from exc


def _page_stack(
    path: Path,
    pages: list[tuple[str, int]],
    shapes: list[tuple[int, int]],
    dtype: np.dtype,
    pieces: tuple[int, int],
    header: _TiffHeader,
    layout: str = "",
) -> Stack:
    """A stack of single TIFF pages (file, index in its chain) of ``shapes``, centred on the smallest canvas that
    holds them all; ``layout`` says how the sections were gathered (the canvas is added when sizes differ)."""
    canvas = (max(height for height, _ in shapes), max(width for _, width in shapes))
    shape3 = (len(pages), *canvas)
    _kept_axes(str(path), shape3, dtype)
    if len(set(shapes)) > 1:
        layout = f"{layout}; " if layout else f"{path}: "
        layout += (
            f"sections of {len(set(shapes))} sizes centred on a {canvas[0]} x {canvas[1]} canvas (margins: no data)"
        )
    pages, shapes = tuple(pages), tuple(shapes)
    reader = functools.partial(_read_placed_page, pages, shapes, canvas)
    data = _sections(reader, shape3, dtype, _read_chunks(pieces, canvas))
    locate = functools.partial(_page_name, pages)
    return Stack(data, str(path), header.voxel_size, header.unit, 0, locate, header.voxel_known, reader, layout)


def _open_tiff(path: Path, level: int) -> Stack:
    header = _tiff_header(path)
    if header.pages is not None:
        if level != 0:
            raise _err(path, f"level {level} out of range (the TIFF's sections are single pages: only level 0)")
        pages, dtype, layout = header.pages, header.levels[0][1], f"{path}: {header.pages_note}"
        located = [(str(path), index) for index, _, _ in pages]
        return _page_stack(path, located, [shape for _, shape, _ in pages], dtype, pages[0][2], header, layout)
    if not 0 <= level < len(header.levels):
        raise _err(path, f"level {level} out of range (the TIFF has {len(header.levels)} level(s))")
    shape, dtype, offset, pieces = header.levels[level]
    keep = _kept_axes(str(path), shape, dtype)
    shape3 = tuple(shape[axis] for axis in keep)
    if offset is not None:
        dtype_in_file = dtype.newbyteorder(header.byteorder)
        reader = functools.partial(_read_raw_region, str(path), offset, dtype_in_file, shape3[1:])
        pieces = (1, 1)
    elif pieces is not None:
        reader = functools.partial(_read_page_region, str(path), level)
    else:
        reader = functools.partial(_read_tiff_section, str(path), level, (0,) * keep[0], shape3[1:])
    data = _sections(reader, shape3, dtype, pieces and _read_chunks(pieces, shape3[1:]))
    return Stack(
        data, str(path), header.voxel_size, header.unit, level, voxel_known=header.voxel_known, read_part=reader
    )


def _open_tiff_folder(path: Path, level: int) -> Stack:
    files = sorted(
        (f for f in path.iterdir() if f.suffix.lower() in _TIFF_SUFFIXES and not f.name.startswith(".")),
        key=_natural_key,
    )
    if not files:
        raise _err(path, "is not a recognised stack (no Zarr metadata and no .tif/.tiff files)")
    if level != 0:
        raise _err(path, f"level {level} out of range (a folder of TIFF sections has only level 0)")
    headers = [_tiff_header(file) for file in files]
    shapes = []
    for file, header in zip(files, headers, strict=True):
        shape, dtype, _, pieces = header.levels[0]
        shape2 = tuple(s for s in shape if s != 1) if len(shape) > 2 else tuple(shape)
        if len(shape2) != 2:
            raise _err(path, f"{file.name} has shape {tuple(shape)}; each file must hold one 2D section")
        if pieces is None:
            raise _err(path, f"{file.name} does not hold its section as one grey-level page (multi-sample or 3D tiles)")
        if dtype != headers[0].levels[0][1]:
            raise _err(
                path,
                f"sections differ in type: {files[0].name} is {headers[0].levels[0][1]} but {file.name} is {dtype}",
            )
        shapes.append(shape2)
    pages = [(str(file), header.first_page) for file, header in zip(files, headers, strict=True)]
    first = headers[0].levels[0]
    return _page_stack(path, pages, shapes, first[1], first[3], headers[0], _numbering_gaps(path, files))


def _numbering_gaps(path: Path, files: list[Path]) -> str:
    """A note naming the numbers missing from a folder's section files, when each name ends in a distinct number
    (counted in the numbers' common step, e.g. 40 for z in nm; fewer missing than present); empty otherwise."""
    numbers = [re.findall(r"\d+", file.stem) for file in files]
    if len(files) < 3 or not all(numbers) or len({int(n[-1]) for n in numbers}) < len(files):
        return ""
    present = sorted(int(n[-1]) for n in numbers)
    step = math.gcd(*(b - a for a, b in itertools.pairwise(present)))
    if (present[-1] - present[0]) // step >= 2 * len(files):  # more missing than present: no section numbers
        return ""
    missing = sorted(set(range(present[0], present[-1] + 1, step)) - set(present))
    if not missing:
        return ""
    named = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    return (
        f"{path}: the file numbers skip {named} ({len(missing)} missing); a gap's two sides are aligned as neighbours"
    )


def _multiscales(attrs: Any) -> dict | None:
    """The first `multiscales` entry of NGFF 0.4 (top-level) or 0.5 (under "ome") attributes, else None."""
    attrs = dict(attrs)
    found = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    return found[0] if found else None


def _open_zarr(path: str | os.PathLike, level: int, dataset: str | None) -> Stack:
    try:
        node = zarr.open(stores.zarr_store(path), mode="r")
    except Exception as exc:
        raise _err(path, f"is not a readable Zarr store ({_reason(exc)})") from exc
    if dataset:
        if not isinstance(node, zarr.Group) or dataset not in node:
            raise _err(path, f"has no array or group {dataset!r}")
        node = node[dataset]
    names, scale, unit = None, None, "nanometer"
    if isinstance(node, zarr.Group):
        multiscales = _multiscales(node.attrs)
        if multiscales is None:
            found = ", ".join(sorted(node.keys())[:10]) or "nothing"
            raise _err(
                path, f"is a Zarr group without OME-Zarr multiscales; pass dataset= naming an array (found: {found})"
            )
        datasets = multiscales["datasets"]
        if not 0 <= level < len(datasets):
            raise _err(
                path, f"level {level} out of range (the pyramid has {len(datasets)} levels: 0..{len(datasets) - 1})"
            )
        array = node[datasets[level]["path"]]
        axes = [{"name": a} if isinstance(a, str) else a for a in multiscales.get("axes", [])]
        names = [a["name"] for a in axes] or None
        scale = np.ones(array.ndim)
        for transform in datasets[level].get("coordinateTransformations", []) + multiscales.get(
            "coordinateTransformations", []
        ):
            if transform.get("type") == "scale" and "scale" in transform:
                scale = scale * np.asarray(transform["scale"], dtype=float)
        if axes and axes[-1].get("unit"):
            unit = axes[-1]["unit"]
    elif level != 0:
        raise _err(path, f"level {level} out of range (a plain Zarr array has only level 0)")
    else:
        array = node
    keep = _kept_axes(str(path), array.shape, array.dtype, names)
    if len(array.chunks) != array.ndim or min(array.chunks) < 1:
        raise _err(path, f"is not a readable Zarr store (invalid chunk shape {tuple(array.chunks)})")
    chunks = [
        min(s, c * max(1, DASK_XY // c)) if axis >= array.ndim - 2 else c
        for axis, (s, c) in enumerate(zip(array.shape, array.chunks, strict=True))
    ]
    data = da.from_zarr(array, chunks=tuple(chunks))[tuple(slice(None) if a in keep else 0 for a in range(array.ndim))]
    voxel_size = tuple(float(scale[a]) for a in keep) if scale is not None else (1.0, 1.0, 1.0)
    locate = functools.partial(_bad_zarr_chunks, array, keep[0])
    read_part = functools.partial(_read_zarr_part, array, tuple(keep))
    return Stack(data, str(path), voxel_size, unit, level, locate, scale is not None, read_part)


def _read_zarr_part(array: zarr.Array, keep: tuple[int, int, int], z: int, rows: slice, cols: slice) -> np.ndarray:
    """Part (rows, cols) of section z of ``array`` whose (z, y, x) are axes ``keep`` (0 on the others)."""
    key = [0] * array.ndim
    key[keep[0]], key[keep[1]], key[keep[2]] = z, rows, cols
    return np.asarray(array[tuple(key)])


def _bad_zarr_chunks(array: zarr.Array, z_axis: int, z: int) -> str:
    """The keys (relative to the store) of the chunks of section z that cannot be read, e.g. "chunk 0/3.0.0"."""
    ranges = [
        [z // c] if axis == z_axis else range(-(-s // c)) if axis > z_axis else [0]
        for axis, (s, c) in enumerate(zip(array.shape, array.chunks, strict=True))
    ]
    bad = []
    for coords in itertools.product(*ranges):
        try:
            array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks, strict=True))]
        except Exception:
            bad.append("/".join(p for p in (array.path, array.metadata.encode_chunk_key(coords)) if p))
            if len(bad) == 3:
                break
    return f"chunk{'s' * (len(bad) > 1)} {', '.join(bad)}" if bad else ""


def open_stack(path: str | os.PathLike, level: int = 0, dataset: str | None = None) -> Stack:
    """Open a (z, y, x) stack lazily: a Zarr v2/v3 array, an OME-Zarr image (pyramid `level`), a multi-page TIFF,
    or a folder of single-section TIFFs (natural name order). `dataset` names an array or image inside a Zarr group.
    A URL (:mod:`emalign.stores`) must hold Zarr or OME-Zarr.
    """
    if stores.is_url(path):
        if not stores.exists(path):
            raise _err(path, "does not exist")
        if not stores.is_zarr(path):
            raise _err(path, "is not a Zarr store (a URL input must be Zarr or OME-Zarr; import TIFFs locally first)")
        stack = _open_zarr(path, level, dataset)
        warn_if_incomplete(path)
        return stack
    p = Path(stores.local(path))
    if not p.exists():
        raise _err(path, "does not exist")
    if dataset and not stores.is_zarr(p):
        raise _err(path, f"dataset={dataset!r} given but this is not a Zarr store")
    if p.is_file():
        return _open_tiff(p, level)
    if stores.is_zarr(p):
        stack = _open_zarr(p, level, dataset)
        warn_if_incomplete(p)
        return stack
    return _open_tiff_folder(p, level)


def warn_if_incomplete(path: str | os.PathLike, stacklevel: int = 3) -> None:
    """Warn (IncompleteOutputWarning) if `path` is an emalign output (alignment or import) whose run has not
    finished: its unwritten sections read as zeros."""
    attrs = emalign_attrs(path)
    if attrs is None or attrs.get("complete"):
        return
    try:
        done = np.asarray(zarr.open_group(stores.zarr_store(path), mode="r")["done"][:], bool)
        written = f"{int(done.sum())} of {done.size} sections written"
    except Exception:
        written = "not all sections written"
    warnings.warn(
        f"{path}: an unfinished emalign output ({written}; the rest read as zeros); "
        "run the command that made it again to finish it",
        IncompleteOutputWarning,
        stacklevel=stacklevel,
    )


def check_finite(section: np.ndarray, path: str, z: int) -> None:
    """Raise EmalignError if a section holds NaN or infinite values, or values beyond +-MAX_ABS_VALUE (the
    alignment computes in float32 and sums squares of pixel values: larger values would overflow)."""
    if section.dtype.kind == "f" and not np.isfinite(section).all():
        bad = int(section.size - np.count_nonzero(np.isfinite(section)))
        raise _err(path, f"section {z} has {bad} NaN or infinite pixel(s)")
    if section.size and section.dtype.itemsize >= 4:
        peak = max(abs(float(section.min())), abs(float(section.max())))
        if peak > MAX_ABS_VALUE:
            raise _err(
                path,
                f"section {z} has values up to {peak:.3g}; emalign needs |values| <= {MAX_ABS_VALUE:.0e} "
                "(rescale the stack)",
            )


def check_array(array: Any, name: str = "array") -> np.ndarray:
    """An in-memory stack checked like a file: numeric, 3D (singleton axes dropped), non-empty, finite.

    ``name`` stands for the path in error messages.
    """
    array = np.asarray(array)
    keep = _kept_axes(name, array.shape, array.dtype)
    array = array.reshape([array.shape[axis] for axis in keep])
    for z in range(array.shape[0]):
        check_finite(array[z], name, z)
    return array


def check_chunk(
    stack: Stack, z: int, require_finite: bool = True, region: tuple[slice, slice] | None = None
) -> np.ndarray:
    """Read section z of `stack` (or its (y, x) `region`) into memory; a read/decode error becomes an EmalignError
    naming the section and, where it can be found, the file or chunk. `require_finite`: :func:`check_finite` too."""
    if not 0 <= z < stack.shape[0]:
        raise _err(stack.path, f"section {z} out of range (the stack has {stack.shape[0]} sections)")
    # a strided region is read whole and subsampled here: dask's strided slicing is several times slower
    steps = tuple(slice(None, None, r.step) for r in region or ())
    window = None if region is None else tuple(_bounds(r, n) for r, n in zip(region, stack.shape[1:], strict=True))
    try:
        if window is not None and stack.read_part is not None:
            section = stack.read_part(z, *window)
        else:
            section = np.asarray((stack.data[z] if window is None else stack.data[z][window]).compute(scheduler="sync"))
        section = section[steps]
    except Exception as exc:
        where = ""
        if stack.locate is not None:
            with contextlib.suppress(Exception):
                where = stack.locate(z)
        where = f"{where}: " if where else ""
        raise _err(stack.path, f"section {z} could not be read ({where}{_reason(exc)})") from exc
    if require_finite:
        check_finite(section, stack.path, z)
    return section


def read_tile(stack: Stack, z: int, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """The ``shape`` (y, x) part at ``origin`` of section z of ``stack`` as read (:func:`check_chunk`, no finiteness
    check): the tiles :meth:`OmeZarrWriter.write_tiled` asks for, when a section is copied as it is."""
    region = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
    return check_chunk(stack, z, require_finite=False, region=region)


def _bounds(part: slice, length: int) -> slice:
    """``part``'s start and stop clipped to an axis of ``length`` (stop >= start; no step)."""
    start, stop, _ = slice(part.start, part.stop).indices(length)
    return slice(start, max(start, stop))


def _shard_shape(shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int]) -> tuple[int, ...]:
    """``shards`` capped to the array: at most the whole chunks covering ``shape`` per axis (chunks already capped).

    Each shard side must be a multiple of the chunk side (ValueError otherwise)."""
    capped = tuple(min(int(sh), -(-s // c) * c) for s, c, sh in zip(shape, chunks, shards, strict=True))
    if any(sh < c or sh % c for sh, c in zip(capped, chunks, strict=True)):
        raise ValueError(f"shards {tuple(shards)} are not whole multiples of the chunks {tuple(chunks)}")
    return capped


def create_array(
    group: str | os.PathLike | zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    attrs: dict | None = None,
    overwrite: bool = False,
    fill_value: Any = 0,
    *,
    shards: Sequence[int] | None = None,
    image_axes: Sequence[str] | None = None,
    zarr_format: int | None = None,
) -> zarr.Array:
    """A Blosc-zstd compressed array ``name`` in ``group`` (a group, or the path of one, opened or created), chunks
    capped to the shape, in the group's Zarr format (``zarr_format`` for a new group; default 3).

    Chunk keys are '/'-separated v2 keys (``name/3/0/0``) in both formats, except for an NGFF image level
    (``image_axes`` given) on Zarr v3: default keys (``name/c/3/0/0``) and ``image_axes`` as dimension names.
    Zarr v3 only: ``shards`` (whole multiples of the chunks, capped to the shape) pack chunks into one file each
    (a write to part of a shard rewrites the file: tasks must not share shards)."""
    if not isinstance(group, zarr.Group):
        group = zarr.open_group(stores.zarr_store(group, writable=True), mode="a", zarr_format=zarr_format)
    shape = tuple(int(s) for s in shape)
    chunks = tuple(max(1, min(int(c), s)) for c, s in zip(chunks, shape, strict=True))
    v3 = group.metadata.zarr_format == 3
    layout: dict[str, Any] = {"compressors": COMPRESSOR_V3 if v3 else COMPRESSOR}
    if not (v3 and image_axes):
        layout["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    if v3:
        layout["dimension_names"] = image_axes
        if shards is not None and (shards := _shard_shape(shape, chunks, shards)) != chunks:
            layout["shards"] = shards
    elif shards is not None:
        raise ValueError(f"{name}: Zarr v2 has no shards")
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        attributes=attrs,
        overwrite=overwrite,
        **layout,
    )


def check_layout(path: str | os.PathLike, ngff: str, shard: int, chunks: Sequence[int] = SECTION_CHUNKS) -> None:
    """Refuse an unknown NGFF version, or a shard side that is negative or not a multiple of the y/x chunks."""
    if ngff not in NGFF_VERSIONS:
        raise _err(path, f"--ngff {ngff!r}: expected one of {', '.join(NGFF_VERSIONS)}")
    if shard < 0 or (shard and any(shard % int(c) for c in chunks[1:])):
        raise _err(path, f"--shard {shard}: expected 0 (no shards) or a multiple of the {tuple(chunks[1:])} px chunks")


def _level_shape(shape: Sequence[int], level: int) -> tuple[int, int, int]:
    """Shape of pyramid level `level`: z kept, y and x halved `level` times, rounding up."""
    f = 2**level
    return int(shape[0]), -(-int(shape[1]) // f), -(-int(shape[2]) // f)


def _auto_levels(shape: Sequence[int]) -> int:
    levels = 1
    while min(_level_shape(shape, levels - 1)[1:]) > PYRAMID_TOP:
        levels += 1
    return levels


def cast_to_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to `dtype`, rounding and clipping floats into integer types."""
    if dtype.kind in "ui" and array.dtype.kind == "f":
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _block_means(block: np.ndarray, factor: int, dtype: np.dtype) -> np.ndarray:
    return cast_to_dtype(block_mean(block, factor), dtype)


def downsampled(stack: Stack, factor: int) -> Stack:
    """`stack` as block means of `factor` x `factor` pixels (a last partial block in y or x dropped), its dtype;
    voxel size multiplied. Output pixel i covers input pixels factor * i .. factor * i + factor - 1."""
    if factor == 1:
        return stack
    data = stack.data
    height, width = (side // factor * factor for side in data.shape[1:])
    if min(height, width) < factor:
        raise _err(stack.path, f"sections of {data.shape[1]} x {data.shape[2]} px are too small for {factor}x means")
    sizes = [max(factor, chunk // factor * factor) for chunk in data.chunksize[1:]]
    data = data[:, :height, :width].rechunk({1: sizes[0], 2: sizes[1]})
    means = data.map_blocks(
        _block_means,
        factor,
        stack.dtype,
        chunks=(data.chunks[0], tuple(c // factor for c in data.chunks[1]), tuple(c // factor for c in data.chunks[2])),
        dtype=stack.dtype,
    )
    voxel = (stack.voxel_size[0], stack.voxel_size[1] * factor, stack.voxel_size[2] * factor)
    return replace(stack, data=means, voxel_size=voxel, read_part=None)


def downsample2(section: np.ndarray) -> np.ndarray:
    """2x2 mean in (y, x), odd sides padded by repeating the edge; integer results rounded, dtype preserved.

    Output pixel i covers input pixels 2i and 2i+1, so its centre sits at input coordinate 2i + 0.5."""
    return cast_to_dtype(block_mean(section, 2, edges="pad"), section.dtype)


def _z_order(rows: int, cols: int, side: int) -> list[tuple[int, int]]:
    """Origins ``(y0, x0)`` of a ``rows x cols`` grid of tiles of ``side`` px in Z-order (Morton): every aligned
    block of ``2^k x 2^k`` tiles comes in one run."""

    def key(index: tuple[int, int]) -> int:
        return sum(((index[0] >> bit) & 1) << (2 * bit + 1) | ((index[1] >> bit) & 1) << (2 * bit) for bit in range(32))

    order = sorted(itertools.product(range(rows), range(cols)), key=key)
    return [(row * side, col * side) for row, col in order]


def emalign_attrs(path: str | os.PathLike) -> dict | None:
    """attrs["emalign"] of an emalign output at `path` (a local path or a URL), or None if it is not one."""
    if not stores.is_zarr(path):
        return None
    try:
        found = zarr.open_group(stores.zarr_store(path), mode="r").attrs.get("emalign")
    except Exception:
        return None
    return dict(found) if isinstance(found, dict) else None


def is_complete(path: str | os.PathLike) -> bool:
    """True if `path` is an emalign output whose every section has been written and marked complete."""
    return bool((emalign_attrs(path) or {}).get("complete"))


def _jsonable(value: Any) -> Any:
    """JSON form of numpy values and other objects (paths become strings)."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else str(value)


def _version() -> str:
    try:
        return importlib.metadata.version("emalign")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class OmeZarrWriter:
    """Writes a (z, y, x) stack section by section into OME-Zarr with a 2x pyramid: NGFF 0.5 on Zarr v3 with
    sharded levels (default), or NGFF 0.4 on Zarr v2.

    Level l has shape (Z, ceil(Y / 2^l), ceil(X / 2^l)). A bool array `done` (one chunk per section) records the
    sections whose every level is written, so a killed run resumes. Shards are as deep in z as the chunks (one
    section by default), so concurrent writers of different sections never write the same file (a shard write
    reads, modifies and rewrites the whole file). attrs["emalign"] holds provenance, "params" and "complete"
    (set by `mark_complete`). Create the output once (`create`), then any process may `open` it.
    """

    def __init__(self, path: str, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.arrays = [group[d["path"]] for d in (_multiscales(group.attrs) or {})["datasets"]]
        self.done = group["done"]

    @property
    def ngff(self) -> str:
        """The NGFF version of the output: "0.5" (Zarr v3) or "0.4" (Zarr v2)."""
        return "0.4" if self.group.metadata.zarr_format == 2 else "0.5"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.arrays[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.arrays[0].dtype)

    @property
    def attrs(self) -> dict:
        """The emalign provenance attributes (attrs["emalign"])."""
        return dict(self.group.attrs["emalign"])

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        unit: str = "nanometer",
        chunks: Sequence[int] | None = None,
        levels: int | None = None,
        attrs: dict | None = None,
        overwrite: bool = False,
        *,
        ngff: str = NGFF_VERSIONS[0],
        shard: int = SHARD_XY,
    ) -> OmeZarrWriter:
        """Create an empty output; an existing output with the same attrs["params"] is opened for resume instead.

        `chunks`: default SECTION_CHUNKS. `ngff`: "0.5" (Zarr v3) or "0.4" (Zarr v2). `shard`: y/x side (px) of
        the 0.5 levels' shards, a multiple of the chunks (0: no shards; capped to each level). Refused: a file at
        `path`, a non-empty folder that is not Zarr, and (unless `overwrite`) an emalign output with other params
        or another Zarr store. `overwrite=True` deletes the existing Zarr store first.
        """
        path = stores.local(path)
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        chunks = tuple(int(c) for c in chunks or SECTION_CHUNKS)
        attrs = json.loads(json.dumps(attrs or {}, default=_jsonable))  # as they will read back
        if len(shape) != 3 or min(shape) < 1 or (levels is not None and levels < 1):
            raise _err(path, f"cannot create an output of shape {shape} with {levels} pyramid level(s)")
        if stores.is_url(path):
            stores.check_writable(path)  # a read-only scheme, a missing bucket, denied access: before anything
        if stores.is_file(path):
            raise _err(path, "exists and is a file; expected a folder for the OME-Zarr output")
        existing = emalign_attrs(path)
        if existing is not None and not overwrite:
            if existing.get("params") != attrs.get("params"):
                raise _err(
                    path, "holds an emalign output made with different params; pass overwrite=True to replace it"
                )
            writer = cls.open(path)
            check_writable(path)
            if (writer.shape, writer.dtype, writer.ngff) != (shape, dtype, ngff):
                raise _err(
                    path,
                    f"holds an NGFF {writer.ngff} output of shape {writer.shape} {writer.dtype}, not NGFF {ngff} "
                    f"{shape} {dtype}; pass overwrite=True to replace it",
                )
            return writer
        if not stores.is_empty(path):
            if not stores.is_zarr(path):
                raise _err(path, "exists, is not empty and is not a Zarr store; refusing to write into it")
            if not overwrite:
                raise _err(path, "holds a Zarr store that is not an emalign output; pass overwrite=True to replace it")
        check_layout(path, ngff, shard, chunks)
        created = not stores.exists(path)
        try:
            return cls._create(path, shape, dtype, voxel_size, unit, chunks, levels, attrs, ngff, shard)
        except OSError as exc:
            if created:  # leave no half-made output behind (a full disk gets its space back)
                with contextlib.suppress(OSError, EmalignError):
                    stores.remove(path)
            raise _err(path, f"cannot write the output here ({_os_reason(exc)})") from exc

    @classmethod
    def _create(
        cls,
        path: str | os.PathLike,
        shape: tuple[int, int, int],
        dtype: np.dtype,
        voxel_size: Sequence[float],
        unit: str,
        chunks: Sequence[int],
        levels: int | None,
        attrs: dict,
        ngff: str,
        shard: int,
    ) -> OmeZarrWriter:
        count = levels or _auto_levels(shape)
        ome = image_attrs(Path(str(path)).stem, voxel_size, unit, count, ngff, str(path))
        stores.remove(path)
        v2 = ngff == "0.4"
        group = zarr.open_group(stores.zarr_store(path, writable=True), mode="w", zarr_format=2 if v2 else 3)
        shards = None if v2 or not shard else (chunks[0], shard, shard)
        for level in range(count):
            create_array(group, str(level), _level_shape(shape, level), chunks, dtype, shards=shards, image_axes=AXES)
        create_array(group, "done", (shape[0],), (1,), bool, fill_value=False)
        group.attrs.update({**ome, "emalign": {**attrs, "complete": False}})
        return cls(str(path), group)

    @classmethod
    def open(cls, path: str | os.PathLike) -> OmeZarrWriter:
        """Open an existing emalign output to resume writing."""
        path = stores.local(path)
        if not stores.exists(path):
            raise _err(path, "does not exist")
        try:  # opened once: on an object store each metadata read is a request
            group = zarr.open_group(stores.zarr_store(path, writable=True), mode="r+")
        except Exception:
            group = None
        if group is None or not isinstance(group.attrs.get("emalign"), dict):
            raise _err(path, "is not an emalign OME-Zarr output")
        return cls(str(path), group)

    def write_section(self, z: int, section: np.ndarray) -> None:
        """Write section z at level 0 and its downsampled copies at every pyramid level, then mark z done."""
        section = np.asarray(section)
        if section.shape != self.shape[1:] or not 0 <= z < self.shape[0]:
            raise _err(self.path, f"cannot write section {z} of shape {section.shape} into a stack of {self.shape}")
        self.write_tiled(
            z, lambda origin, shape: section[origin[0] : origin[0] + shape[0], origin[1] : origin[1] + shape[1]]
        )

    def tile_side(self) -> int:
        """Side (px) of the level-0 tiles :meth:`write_tiled` asks for: one shard (unsharded: :data:`WRITE_TILE`),
        made a multiple of ``2^(levels - 1)`` so that every level's part of a tile is whole pixels."""
        first = self.arrays[0]
        side = first.shards[1] if first.shards else WRITE_TILE
        return math.lcm(side, 2 ** (len(self.arrays) - 1))

    def write_tiled(self, z: int, tile: Callable[[tuple[int, int], tuple[int, int]], np.ndarray]) -> None:
        """Write section z tile by tile: ``tile(origin, shape)`` gives the level-0 pixels of each tile
        (:meth:`tile_side`, in Z-order), written with their downsampled copies at every level; z is marked done
        after the last. Memory: a tile, and per level one group of tiles that fills its shards (chunks) whole, so
        every shard is written once, whole (no read-modify-write of a shard, nor of one a killed run tore)."""
        if not 0 <= z < self.shape[0]:
            raise _err(self.path, f"cannot write section {z} into a stack of {self.shape}")
        height, width = self.shape[1:]
        side = self.tile_side()
        groups = [  # level-0 px per axis of a level's group of tiles: whole shards (chunks) of that level
            tuple(max(side, (array.shards or array.chunks)[axis] * 2**level) for axis in (1, 2))
            for level, array in enumerate(self.arrays)
        ]
        pending: dict[int, tuple[tuple[int, int], np.ndarray, int]] = {}  # level -> group origin, pixels, tiles left
        for y0, x0 in _z_order(-(-height // side), -(-width // side), side):
            shape = (min(side, height - y0), min(side, width - x0))
            pixels = cast_to_dtype(np.asarray(tile((y0, x0), shape)), self.dtype)
            if pixels.shape != shape:
                raise _err(self.path, f"tile of shape {pixels.shape} at {(y0, x0)} of section {z}; expected {shape}")
            self._write(self.arrays[0], z, (y0, x0), pixels)
            for level in range(1, len(self.arrays)):
                pixels = downsample2(pixels)
                self._gather(pending, level, z, (y0, x0), pixels, groups[level], side)
        self._write(self.done, z, (), True)

    def _gather(
        self,
        pending: dict[int, tuple[tuple[int, int], np.ndarray, int]],
        level: int,
        z: int,
        origin: tuple[int, int],
        pixels: np.ndarray,
        group: tuple[int, int],
        side: int,
    ) -> None:
        """Place one tile's level-``level`` ``pixels`` (its level-0 ``origin``) into its group, and write the
        group once its last tile is in."""
        array, f = self.arrays[level], 2**level
        start = tuple(o // g * g for o, g in zip(origin, group, strict=True))
        if level not in pending:
            extent = [min(g, n - a) for g, n, a in zip(group, self.shape[1:], start, strict=True)]
            tiles = math.prod(-(-e // side) for e in extent)
            size = [min(-(-(a + e) // f), n) - a // f for a, e, n in zip(start, extent, array.shape[1:], strict=True)]
            pending[level] = (start, np.zeros(size, array.dtype), tiles)
        first, buffer, left = pending[level]
        y, x = origin[0] // f - first[0] // f, origin[1] // f - first[1] // f
        buffer[y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels
        if left > 1:
            pending[level] = (first, buffer, left - 1)
        else:
            del pending[level]
            self._write(array, z, (first[0] // f, first[1] // f), buffer)

    def _write(self, array: zarr.Array, z: int, origin: tuple[int, ...], value: Any) -> None:
        """``array[z]`` (or its part at ``origin``) ``= value``; an OSError naming no file (a full disk) gets the file
        of the first chunk written."""
        where = (z, *(slice(o, o + n) for o, n in zip(origin, np.shape(value), strict=True)))
        try:
            array[where] = value
        except OSError as exc:
            if exc.filename is not None:
                raise
            unit = array.shards or array.chunks
            first = tuple(i // u for i, u in zip((z, *origin), unit, strict=True))
            key = array.metadata.encode_chunk_key(first)
            raise OSError(exc.errno, exc.strerror, stores.join(self.path, array.path, key)) from exc

    def done_sections(self) -> np.ndarray:
        """Bool per section: True once all its levels are written."""
        return np.asarray(self.done[:], dtype=bool)

    def mark_complete(self) -> None:
        """Set attrs["emalign"]["complete"] = True; every section must be done."""
        missing = np.flatnonzero(~self.done_sections())
        if missing.size:
            raise _err(self.path, f"cannot mark complete: {missing.size} section(s) not written (first: {missing[0]})")
        self.group.attrs["emalign"] = {**self.attrs, "complete": True}


def import_stack(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    chunks: Sequence[int] = SECTION_CHUNKS,
    level: int = 0,
    progress: bool = True,
    *,
    dataset: str | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    levels: int | None = None,
    overwrite: bool = False,
    ngff: str = NGFF_VERSIONS[0],
    shard: int = SHARD_XY,
) -> str:
    """Stream any readable stack into an OME-Zarr at `dst`, a section at a time, tile by tile; resumes a partial
    import.

    `ngff`, `shard`: the output layout (see :meth:`OmeZarrWriter.create`)."""
    stack = open_stack(src, level=level, dataset=dataset)
    voxel_size = [float(v) for v in (stack.voxel_size if voxel_size is None else voxel_size)]
    if unit is not None and str(unit).strip().lower() not in _UNITS:
        raise _err(dst, f"unit {unit!r} is not a known length unit (e.g. nanometer, nm, micrometer, um)")
    unit = _UNITS[str(unit).strip().lower()] if unit is not None else stack.unit
    source = stores.absolute(src)
    params = {
        "step": "import",
        "src": source,
        "dataset": dataset,
        "level": level,
        "chunks": list(chunks),
        "levels": levels,
        "voxel_size": voxel_size,
        "unit": unit,
        "ngff": ngff,
        "shard": shard,
    }
    attrs = {
        "version": _version(),
        "input": {"path": source, "shape": list(stack.shape), "dtype": str(stack.dtype)},
        "params": params,
    }
    writer = OmeZarrWriter.create(
        dst, stack.shape, stack.dtype, voxel_size, unit, chunks, levels, attrs, overwrite, ngff=ngff, shard=shard
    )
    todo = np.flatnonzero(~writer.done_sections())
    total = stack.shape[0]
    if progress and stack.layout:
        tqdm.write(stack.layout)
    for z in tqdm(
        todo, f"import {Path(src).name}", total, initial=total - todo.size, unit="section", disable=not progress
    ):
        writer.write_tiled(int(z), functools.partial(read_tile, stack, int(z)))
    writer.mark_complete()
    return str(dst)
