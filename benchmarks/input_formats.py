"""Reading large sections from each input format: the time and memory of the reads the stages make.

    python benchmarks/input_formats.py [--sizes 8192,16384,32768] [--formats zarr,tiff,...] [--baseline DIR]
                                       [--align 8192:4 [--align-formats tiff-tiles,tiff-one-strip]]

For every section side and format, a 2-section stack of the procedural texture (a 1024^2 `synth.em_texture`
volume tiled periodically) is written as:

- ``zarr``: OME-Zarr as `emalign import` writes it (512^2 chunks in 4096^2 shards), imported from ``tiff``;
- ``tiff``: a multi-page TIFF, uncompressed and contiguous (as ImageJ and tifffile write it by default);
- ``tiff-strips``: zlib in strips of 16 rows, a section per page (as most microscope software writes);
- ``tiff-lzw``: LZW with horizontal differencing in strips of 16 rows (as Bio-Formats, Pillow, Photoshop save LZW);
- ``tiff-one-strip``: zlib with horizontal differencing, a section per strip (as some exporters write a page);
- ``tiff-tiles``: zlib in 512^2 tiles;
- ``tiff-folder``: a folder of one-section TIFFs in zlib 512^2 tiles.

Each operation then runs in a fresh process (so that one's heap does not carry into the next):

- ``part``: 8 parts of 2048^2 px of section 1 at seeded places, each read alone (`io.check_chunk(region=...)`, as the
  estimate and the render read them): seconds per part;
- ``means``: section 1 as 8 x 8 block means, whole (`io.downsampled`, as the prealignment reads it): seconds;
- ``import``: `emalign import` of the stack (`io.import_stack`, tile by tile): seconds per section;

and reports its seconds and its peak memory above what the process held before it (VmHWM reset through
/proc/self/clear_refs once the stack is open). ``--baseline DIR`` also runs every operation with ``PYTHONPATH=DIR``
(an older checkout's package, e.g. from `git archive`) and gives its figures beside. ``--align SIZE:SECTIONS`` also
runs `emalign align` end to end on a misaligned stack of that size (speed.py's tiled sections), given as Zarr and in
each of ``--align-formats`` (default: the zlib-tiled TIFF), with this code and the baseline's: pipeline seconds,
MPx/s, peak memory of the process, and how far each output's fields and level-0 pixels are from this code's on the
Zarr. Writes benchmarks/results/input_formats.md; prints each row as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr
from speed import make_tiled_input, run_align

from emalign import synth
from emalign.io import import_stack

RESULTS = Path(__file__).parent / "results"
FORMATS = ("zarr", "tiff", "tiff-strips", "tiff-lzw", "tiff-one-strip", "tiff-tiles", "tiff-folder")
STRIP_CODECS = {  # tifffile's arguments, rowsperstrip 0: the section's height
    "tiff-strips": {"compression": "zlib", "rowsperstrip": 16},
    "tiff-lzw": {"compression": "lzw", "predictor": True, "rowsperstrip": 16},
    "tiff-one-strip": {"compression": "zlib", "predictor": True, "rowsperstrip": 0},
}
OPERATIONS = ("part", "means", "import")
SECTIONS = 2
TEXTURE = 1024
TILE = 512
PART = 2048

_CHILD = """
import json, sys, time
import numpy as np
from emalign import io

def peak_reset():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key)) / 1024

src, operation, part, out = sys.argv[1:5]
stack = io.open_stack(src)
height, width = stack.shape[1:]
part = min(int(part), height, width)
places = np.random.default_rng(0).integers(0, [height - part + 1, width - part + 1], (8, 2))
peak_reset()
before = status("VmRSS")
start = time.perf_counter()
if operation == "part":
    for y, x in places:
        io.check_chunk(stack, 1, region=(slice(y, y + part), slice(x, x + part)))
    seconds = (time.perf_counter() - start) / len(places)
elif operation == "means":
    io.check_chunk(io.downsampled(stack, 8), 1)
    seconds = time.perf_counter() - start
else:
    io.import_stack(src, out, progress=False)
    seconds = (time.perf_counter() - start) / stack.shape[0]
print(json.dumps({"seconds": seconds, "extra_mib": status("VmHWM") - before}))
"""


def _texture_part(base: np.ndarray, y0: int, x0: int, shape: tuple[int, int]) -> np.ndarray:
    """The ``shape`` part at (y0, x0) of the periodic tiling of ``base`` (Y, X)."""
    rows = np.arange(y0, y0 + shape[0]) % base.shape[0]
    cols = np.arange(x0, x0 + shape[1]) % base.shape[1]
    return base[np.ix_(rows, cols)]


def _tiles(part: Callable[[int, int, int], np.ndarray], sections: range, size: int) -> Iterator[np.ndarray]:
    """The TILE^2 tiles ``part(z, y0, x0)`` of ``sections``, row-major, as tifffile's tiled writer takes them."""
    for z in sections:
        for y0 in range(0, size, TILE):
            for x0 in range(0, size, TILE):
                yield part(z, y0, x0)


def write_tiled_tiff(path: Path, part: Callable[[int, int, int], np.ndarray], sections: int, size: int) -> Path:
    """A zlib-tiled multi-page TIFF of ``sections`` x size x size uint8, tile (z, y0, x0) given by ``part``."""
    tifffile.imwrite(
        path, _tiles(part, range(sections), size), shape=(sections, size, size), dtype=np.uint8, tile=(TILE, TILE),
        compression="zlib", bigtiff=True, photometric="minisblack",
    )  # fmt: skip
    return path


def write_strip_tiff(path: Path, sections: Iterable[np.ndarray], name: str) -> Path:
    """A multi-page TIFF of ``sections`` in strips of :data:`STRIP_CODECS` ``[name]``."""
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for section in sections:
            codec = {**STRIP_CODECS[name], "rowsperstrip": STRIP_CODECS[name]["rowsperstrip"] or len(section)}
            writer.write(section, metadata=None, photometric="minisblack", **codec)
    return path


def write_inputs(folder: Path, size: int, formats: list[str]) -> dict[str, Path]:
    """Each of ``formats`` holding the same SECTIONS x size x size stack, in ``folder``."""
    base = synth.em_texture((SECTIONS, TEXTURE, TEXTURE), seed=0, z_step=4.0)
    shape, grey = (SECTIONS, size, size), {"photometric": "minisblack"}
    paths = {}
    raw = folder / "stack.tif"
    mapped = tifffile.memmap(raw, shape=shape, dtype=np.uint8, **grey)
    for z in range(SECTIONS):
        for y0 in range(0, size, 4096):
            rows = min(4096, size - y0)
            mapped[z, y0 : y0 + rows] = _texture_part(base[z], y0, 0, (rows, size))
    mapped.flush()
    del mapped
    paths["tiff"] = raw
    if "zarr" in formats:
        paths["zarr"] = Path(import_stack(raw, folder / "stack.zarr", progress=False))
    for name in set(STRIP_CODECS) & set(formats):
        sections = (_texture_part(base[z], 0, 0, (size, size)) for z in range(SECTIONS))
        paths[name] = write_strip_tiff(folder / f"{name}.tif", sections, name)

    def part(z: int, y0: int, x0: int) -> np.ndarray:
        return _texture_part(base[z], y0, x0, (TILE, TILE))

    if "tiff-tiles" in formats:
        paths["tiff-tiles"] = write_tiled_tiff(folder / "tiles.tif", part, SECTIONS, size)
    if "tiff-folder" in formats:
        paths["tiff-folder"] = folder / "sections"
        paths["tiff-folder"].mkdir()
        for z in range(SECTIONS):
            tifffile.imwrite(
                paths["tiff-folder"] / f"s{z}.tif", _tiles(part, range(z, z + 1), size), shape=(size, size),
                dtype=np.uint8, tile=(TILE, TILE), compression="zlib", bigtiff=True, **grey,
            )  # fmt: skip
    return {name: paths[name] for name in formats}


def measure(src: Path, operation: str, out: Path, pythonpath: str | None) -> dict:
    """One operation on ``src`` in a fresh process (the package from ``pythonpath`` when given)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = [sys.executable, "-c", _CHILD, str(src), operation, str(PART), str(out)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=out.parent)  # not the checkout
    if result.returncode != 0:
        raise RuntimeError(f"{operation} on {src} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def _difference(out: Path, reference: Path) -> tuple[float, int]:
    """Largest difference (px) between two outputs' global fields, and how many level-0 pixels differ."""
    first, second = (zarr.open_group(str(p), mode="r") for p in (out, reference))
    fields = float(np.abs(np.asarray(first["fields/global"][:]) - np.asarray(second["fields/global"][:])).max())
    level, other = first["0"], second["0"]
    differing = sum(
        int(np.count_nonzero(np.asarray(level[z, y : y + 1024]) != np.asarray(other[z, y : y + 1024])))
        for z in range(level.shape[0])
        for y in range(0, level.shape[1], 1024)
    )
    return fields, differing


def align_end_to_end(
    scratch: Path, size: int, sections: int, baseline: str | None, formats: Sequence[str] = ("tiff-tiles",)
) -> list[dict]:
    """`emalign align` of one misaligned stack (speed.py's tiled sections) given as Zarr and in each TIFF format of
    ``formats`` (tiff-tiles or a strip one), by this code and the baseline's: seconds, MPx/s, peak memory, and how far
    each output is from this code's on Zarr."""
    src = scratch / "misaligned.zarr"
    make_tiled_input(src, sections, size)
    array = zarr.open_array(str(src), mode="r")

    def part(z: int, y0: int, x0: int) -> np.ndarray:
        return np.asarray(array[z, y0 : y0 + TILE, x0 : x0 + TILE])

    inputs = {"zarr": src}
    for name in formats:
        path = scratch / f"misaligned-{name}.tif"
        if name == "tiff-tiles":
            inputs[name] = write_tiled_tiff(path, part, sections, size)
        else:
            inputs[name] = write_strip_tiff(path, (np.asarray(array[z]) for z in range(sections)), name)
    codes = [("this", None), *([("baseline", baseline)] if baseline else [])]
    rows, reference = [], None
    for name, path in inputs.items():
        for code, pythonpath in codes:
            out = scratch / f"aligned-{name}-{code}.zarr"
            seconds, _, peak = run_align(path, out, [], pythonpath)
            reference = reference or out
            fields, differing = _difference(out, reference)
            row = {"side": size, "sections": sections, "format": name, "code": code, "seconds": seconds}
            row |= {"mpx_per_s": sections * size * size / 1e6 / seconds, "peak_mib": peak}
            rows.append(row | {"fields_px": fields, "pixels_differing": differing})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def align_table(rows: list[dict]) -> str:
    lines = [
        "| stack | input | code | pipeline s | MPx/s | peak MiB | fields vs this code's Zarr run, px | px differing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sections']} x {row['side']}^2 | {row['format']} | {row['code']} | {row['seconds']:.1f} "
            f"| {row['mpx_per_s']:.2f} | {row['peak_mib']:.0f} | {row['fields_px']:.3g} | {row['pixels_differing']} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], baseline: bool) -> str:
    head = "| side | format | operation | s | extra MiB |"
    rule = "|---|---|---|---|---|"
    if baseline:
        head += " baseline s | baseline extra MiB | time vs baseline |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in rows:
        line = f"| {row['side']} | {row['format']} | {row['operation']} | {row['seconds']:.3f}"
        line += f" | {row['extra_mib']:.0f} |"
        if baseline:
            before = row["baseline"]
            line += f" {before['seconds']:.3f} | {before['extra_mib']:.0f} | {row['seconds'] / before['seconds']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8192,16384,32768", help="section sides (px)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--baseline", default=None, help="PYTHONPATH of the code to compare against")
    parser.add_argument("--scratch", default=None, help="folder for the inputs (default: a temporary one)")
    parser.add_argument(
        "--align",
        default="",
        help="SIZE:SECTIONS: also align a misaligned stack, as Zarr and as TIFF, end to end",
    )
    parser.add_argument(
        "--align-formats",
        default="tiff-tiles",
        help=f"the TIFF formats --align gives the stack in besides Zarr: tiff-tiles, {', '.join(STRIP_CODECS)}",
    )
    parser.add_argument("--out", default=str(RESULTS / "input_formats.md"))
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    operations = [o for o in args.operations.split(",") if o]
    if unknown := set(formats) - set(FORMATS) or set(operations) - set(OPERATIONS):
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    rows, aligned = [], []
    started = time.strftime("%Y-%m-%d")
    if args.align:
        size, sections = (int(n) for n in args.align.split(":"))
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            aligned = align_end_to_end(Path(scratch), size, sections, args.baseline, args.align_formats.split(","))
    for size in (int(s) for s in args.sizes.split(",") if s):
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            made = time.perf_counter()
            inputs = write_inputs(Path(scratch), size, formats)
            print(f"{size}^2: inputs written in {time.perf_counter() - made:.0f} s", flush=True)
            for name, src in inputs.items():
                for operation in operations:
                    out = Path(scratch) / f"imported-{name}.zarr"
                    row = {"side": size, "format": name, "operation": operation, **measure(src, operation, out, None)}
                    if args.baseline:
                        row["baseline"] = measure(src, operation, Path(f"{out}.baseline"), args.baseline)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    text = (
        f"Reads of large sections by input format (`benchmarks/input_formats.py`), {started}\n\n"
        f"{SECTIONS} sections of the tiled procedural texture, uint8; part: seconds per {PART}^2 part of a section; "
        "means: seconds for a section's 8x block means; import: seconds per section. extra MiB: peak resident "
        "memory above what the process held before the operation.\n\n" + table(rows, bool(args.baseline)) + "\n"
    )
    if aligned:
        text += (
            "\n`emalign align` end to end (defaults, two threads), one misaligned stack of speed.py's tiled sections "
            "given as Zarr and as TIFF; fields and pixels against this code's run on the Zarr:\n\n"
            + align_table(aligned)
            + "\n"
        )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
