"""``emalign view --neuroglancer``: the served sources answer over HTTP with CORS headers and byte ranges, their
metadata parses, and the link's state names both layers at the output's voxel size."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emalign.cli import main
from emalign.evaluate import write_tiff
from emalign.io import import_stack, open_stack
from emalign.neuroglancer import start
from emalign.synth import demo_stack

ORIGIN = "https://neuroglancer-demo.appspot.com"


def fetch(url: str, method: str = "GET", **headers: str):
    """``(status, headers, body)`` of a request sent as a browser on Neuroglancer's origin sends it."""
    request = urllib.request.Request(url, method=method, headers={"Origin": ORIGIN, **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, b""


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> tuple[Path, Path]:
    """``raw.zarr`` (NGFF 0.4, Zarr v2) and ``out.zarr`` (NGFF 0.5, sharded levels; made from raw.zarr, so that
    is its recorded input) of a stack with 40 nm sections at 8 nm pixels."""
    folder = tmp_path_factory.mktemp("ng")
    write_tiff(folder / "stack.tif", demo_stack((4, 64, 64), seed=4)[1].stack, (40.0, 8.0, 8.0))
    raw, out = folder / "raw.zarr", folder / "out.zarr"
    import_stack(folder / "stack.tif", raw, (1, 32, 32), levels=2, progress=False, ngff="0.4")
    import_stack(raw, out, (1, 16, 16), levels=2, progress=False, shard=32)
    return raw, out


def test_the_state_names_both_layers_at_the_voxel_size_and_the_sources_answer_with_cors(stacks):
    import neuroglancer
    import tensorstore

    raw, out = stacks
    server, url, state = start(str(out), str(raw))
    try:
        assert url.startswith(f"{ORIGIN}/#!")
        assert json.loads(urllib.parse.unquote(url.split("#!", 1)[1])) == state
        parsed = neuroglancer.parse_url(url)  # the link as Neuroglancer's own state model reads it
        assert parsed.dimensions.names == ("x", "y", "z") and parsed.dimensions.units == ("m", "m", "m")
        np.testing.assert_allclose(parsed.dimensions.scales, [8e-9, 8e-9, 40e-9])
        assert [(layer.name, layer.type) for layer in parsed.layers] == [("raw", "image"), ("aligned", "image")]
        assert state["dimensions"] == {
            "x": [pytest.approx(8e-9), "m"],
            "y": [pytest.approx(8e-9), "m"],
            "z": [pytest.approx(40e-9), "m"],
        }
        assert state["position"] == [32.0, 32.0, 2.0]
        layers = {layer["name"]: layer["source"] for layer in state["layers"]}
        assert layers["raw"].startswith("zarr2://http://127.0.0.1:")
        assert layers["aligned"].startswith("zarr://http://127.0.0.1:")
        for name, (source, local, meta) in {
            "raw": (layers["raw"], raw, ".zattrs"),
            "aligned": (layers["aligned"], out, "zarr.json"),
        }.items():
            base = source.split("://", 1)[1]
            status, headers, body = fetch(base + meta)
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*", name
            text = json.dumps(json.loads(body))
            assert "multiscales" in text and "nanometer" in text
            served = open_stack(base.rstrip("/"), level=1)  # zarr over HTTP parses the metadata and reads the data
            np.testing.assert_array_equal(np.asarray(served.data), np.asarray(open_stack(local, level=1).data))
            assert served.voxel_size == pytest.approx((40.0, 16.0, 16.0))
            driver = "zarr" if source.startswith("zarr2://") else "zarr3"  # a second reader, reading shards by range
            level0 = tensorstore.open({"driver": driver, "kvstore": base + "0/"}, read=True).result()
            np.testing.assert_array_equal(level0.read().result(), np.asarray(open_stack(local).data))
        shard = out / "0" / "c" / "0" / "0" / "0"
        status, headers, body = fetch(layers["aligned"].split("://", 1)[1] + "0/c/0/0/0", Range="bytes=-16")
        assert status == 206 and body == shard.read_bytes()[-16:]
        size = shard.stat().st_size
        assert headers["Content-Range"] == f"bytes {size - 16}-{size - 1}/{size}"
        assert "Content-Range" in headers["Access-Control-Expose-Headers"]
        status, headers, _ = fetch(base, "OPTIONS", **{"Access-Control-Request-Headers": "range"})
        assert status == 204 and "Range" in headers["Access-Control-Allow-Headers"]
        assert headers["Access-Control-Allow-Private-Network"] == "true"
        port = server.server_address[1]
        assert fetch(f"http://127.0.0.1:{port}/elsewhere/zarr.json")[0] == 404
        assert fetch(f"http://127.0.0.1:{port}/aligned/../raw/.zattrs")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_the_raw_layer_defaults_to_the_recorded_input_when_it_is_an_ome_zarr(stacks):
    raw, out = stacks
    server, _, state = start(str(out))
    server.shutdown()
    server.server_close()
    assert [layer["name"] for layer in state["layers"]] == ["raw", "aligned"]
    server, _, state = start(str(raw))  # its input is a TIFF, which Neuroglancer cannot read: no raw layer
    server.shutdown()
    server.server_close()
    assert [layer["name"] for layer in state["layers"]] == ["aligned"]


def test_view_neuroglancer_refuses_a_non_output_and_a_tiff_input_in_one_line(stacks, tmp_path):
    raw, out = stacks
    for args, problem in (
        ([tmp_path], "not an emalign output"),
        ([out, "--input", raw.parent / "stack.tif"], "is not an OME-Zarr image"),
    ):
        result = CliRunner().invoke(main, ["view", "--neuroglancer", *map(str, args)])
        assert result.exit_code == 2 and problem in result.stderr and len(result.stderr.splitlines()) == 1


def test_view_neuroglancer_prints_the_link_and_serves_until_interrupted(stacks):
    raw, _ = stacks  # an import of a TIFF: the TIFF input cannot be shown, the command says so
    command = [sys.executable, "-m", "emalign.cli", "view", "--neuroglancer", str(raw)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        note, served, url = (process.stdout.readline() for _ in range(3))
        assert note.startswith("raw input not shown"), note + process.stderr.read()
        assert served.startswith("serving on http://127.0.0.1:"), served
        state = json.loads(urllib.parse.unquote(url.strip().split("#!", 1)[1]))
        [layer] = state["layers"]
        status, headers, body = fetch(layer["source"].split("://", 1)[1] + ".zattrs")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and json.loads(body)["multiscales"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()
