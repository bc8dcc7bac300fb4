"""``emalign view --neuroglancer OUT``: serve an aligned output (and its raw input) to Neuroglancer.

Local OME-Zarr folders are served read-only over HTTP on this machine, with CORS headers (Neuroglancer runs in
the browser, on another origin; browsers let an https page read http://127.0.0.1 and http://localhost, and
Chrome asks such a server to allow private-network access) and byte ranges (it reads the index of each Zarr v3
shard from the file's end).
Each folder is mounted under its layer's name: ``http://HOST:PORT/aligned/`` and ``http://HOST:PORT/raw/``.
Outputs and inputs given as URLs (``s3://``, ``gs://``, ``https://``) are handed to Neuroglancer as they are.

The link opens a Neuroglancer app with its state in the URL fragment (``#!`` + JSON): one image layer per
source (``zarr://URL`` for NGFF 0.5 on Zarr v3, ``zarr2://URL`` for NGFF 0.4 on Zarr v2; Neuroglancer takes
the voxel size of each pyramid level from the OME multiscales metadata) and global ``dimensions`` x, y, z at the
output's voxel size in metres, the view centred on the stack.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zarr

from emalign import stores
from emalign.errors import EmalignError
from emalign.io import emalign_attrs, open_stack
from emalign.pixelsize import to_nanometres

APP = "https://neuroglancer-demo.appspot.com/"
"""The Neuroglancer app the link opens (any deployment takes the same fragment)."""
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class CorsHandler(SimpleHTTPRequestHandler):
    """Serves the folders of ``mounts`` (``{name: folder}``) under ``/name/``, read-only, with CORS headers and
    single byte ranges (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``)."""

    def __init__(self, *args: object, mounts: dict[str, Path], **kwargs: object) -> None:
        self.mounts = mounts
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        parts = [p for p in urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/") if p]
        if not parts or parts[0] not in self.mounts or any(p in (".", "..") for p in parts):
            return os.path.join(os.devnull, "missing")  # a path that is never a file: 404
        return str(self.mounts[parts[0]].joinpath(*parts[1:]))

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Allow-Private-Network", "true")  # a public page reading from localhost
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()

    def send_head(self):
        """Headers of a byte range (206) when one is asked for a file, else http.server's whole file."""
        wanted = _RANGE.match(self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = wanted.groups()
        start, end = (size - min(int(last), size), size - 1) if not first else (int(first), int(last or size - 1))
        end = min(end, size - 1)
        if start > end:
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            return None
        handle = open(path, "rb")  # noqa: SIM115 (closed by http.server once copied)
        handle.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return handle

    def copyfile(self, source, outputfile) -> None:
        """Copy the asked range (after :meth:`send_head` answered 206), else the whole file."""
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0 and (block := source.read(min(remaining, 1 << 20))):
            outputfile.write(block)
            remaining -= len(block)
        self._remaining = None

    def log_message(self, *args: object) -> None:
        """Quiet: a viewer asks for thousands of chunks."""


def serve(mounts: dict[str, Path], host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start serving ``mounts`` (:class:`CorsHandler`) on ``host:port`` (0: a free port) in a daemon thread."""
    try:
        server = ThreadingHTTPServer((host, port), functools.partial(CorsHandler, mounts=mounts))
    except OSError as exc:
        raise EmalignError(f"{host}:{port}: cannot serve here ({exc.strerror or exc})") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="emalign-neuroglancer", daemon=True).start()
    return server


def _source(path: str, name: str, base: str, mounts: dict[str, Path]) -> str:
    """The Neuroglancer source of the OME-Zarr at ``path``: its URL, or (local) its mount under ``base``."""
    if stores.is_url(path):
        url = stores.absolute(path)
    else:
        mounts[name] = Path(stores.local(path)).resolve()
        url = f"{base}/{name}"
    v2 = zarr.open_group(stores.zarr_store(path), mode="r").metadata.zarr_format == 2
    return f"{'zarr2' if v2 else 'zarr'}://{url}/"


def _ome_zarr(path: str, role: str) -> None:
    """Refuse what Neuroglancer cannot show with its voxel size: anything but an OME-Zarr image."""
    attrs = dict(zarr.open(stores.zarr_store(path), mode="r").attrs) if stores.is_zarr(path) else {}
    if not (attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")):
        raise EmalignError(f"{path}: the {role} is not an OME-Zarr image; `emalign import` it first")


def state(out: str, raw: str | None, base: str) -> tuple[dict, dict[str, Path]]:
    """The Neuroglancer state of the output ``out`` (layer ``aligned``) and ``raw`` (layer ``raw``, None: none)
    with local folders served under ``base`` (``http://HOST:PORT``); returns it and the folders to mount."""
    if emalign_attrs(out) is None:
        raise EmalignError(f"{out}: not an emalign output (expected the OUT of `emalign align` or `import`)")
    stack = open_stack(out)
    metres = [to_nanometres(v, stack.unit) * 1e-9 for v in stack.voxel_size]
    mounts: dict[str, Path] = {}
    layers = []
    if raw is not None:
        _ome_zarr(raw, "raw input")
        layers.append({"type": "image", "name": "raw", "source": _source(raw, "raw", base, mounts), "visible": False})
    layers.append({"type": "image", "name": "aligned", "source": _source(out, "aligned", base, mounts)})
    depth, height, width = stack.shape
    return {
        "dimensions": {"x": [metres[2], "m"], "y": [metres[1], "m"], "z": [metres[0], "m"]},
        "position": [width / 2, height / 2, depth / 2],
        "crossSectionScale": max(1.0, max(height, width) / 1024),
        "layers": layers,
        "selectedLayer": {"layer": "aligned", "visible": True},
        "layout": "4panel",
    }, mounts


def link(ng_state: dict, app: str = APP) -> str:
    """The Neuroglancer URL that opens ``ng_state`` (JSON in the fragment, after ``#!``)."""
    return f"{app.rstrip('/')}/#!{urllib.parse.quote(json.dumps(ng_state, separators=(',', ':')), safe='')}"


def default_raw(out: str) -> str | None:
    """The input recorded in the output, when Neuroglancer can show it (an OME-Zarr image), else None."""
    recorded = ((emalign_attrs(out) or {}).get("input") or {}).get("path")
    if not recorded:
        return None
    try:
        _ome_zarr(recorded, "raw input")
    except EmalignError:
        return None
    return recorded


def start(
    out: str, raw: str | None = None, host: str = "127.0.0.1", port: int = 0, app: str = APP
) -> tuple[ThreadingHTTPServer, str, dict]:
    """Serve ``out`` (and ``raw``; default: the recorded input when it is an OME-Zarr) and return the server, the
    Neuroglancer link and its state. The server runs until ``server.shutdown()``."""
    raw = default_raw(out) if raw is None else raw
    mounts: dict[str, Path] = {}
    server = serve(mounts, host, port)  # bound first: the sources name its port
    bound_host, bound_port = server.server_address[:2]
    try:
        ng_state, found = state(out, raw, f"http://{bound_host}:{bound_port}")
    except BaseException:
        server.shutdown()
        server.server_close()
        raise
    mounts.update(found)
    return server, link(ng_state, app), ng_state
