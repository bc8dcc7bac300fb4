"""Inputs and outputs as URLs: an S3-protocol server on localhost (moto's server mode, started here) and a local
``http.server``; every store is reached through zarr's fsspec store, credentials from the environment."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import invoke, kill_when, ok

from emalign import stores
from emalign.evaluate import write_tiff
from emalign.io import import_stack, is_complete, open_stack
from emalign.pipeline import Workspace
from emalign.synth import demo_stack

SHAPE = (8, 96, 96)
VOXEL = (40.0, 8.0, 8.0)
ALIGN = ["--block", "2", "--polish", "off", "--tile", "64", "--halo", "16", "--device", "cpu", "--quiet"]
BUCKET = "emalign-test"


def error_line(*args: object) -> str:
    """The one line ``error: ...`` (exit status 2, no traceback) of a refused command."""
    result = invoke(*args)
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def level0(out: str | Path) -> np.ndarray:
    return np.asarray(zarr.open_group(stores.zarr_store(out), mode="r")["0"][:])


def global_fields(out: str | Path) -> np.ndarray:
    return np.asarray(zarr.open_group(stores.zarr_store(out), mode="r")["fields/global"][:])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on localhost with one bucket; the AWS variables that s3fs reads point at it. Yields
    ``(endpoint, s3fs file system)``."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    variables = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        stores.WORK_ENV: str(tmp_path_factory.mktemp("work")),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        S3FileSystem.clear_instance_cache()
        fs = S3FileSystem()
        fs.mkdir(BUCKET)
        yield endpoint, fs
        S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A misaligned TIFF with ImageJ calibration (40 nm sections, 8 nm pixels)."""
    path = tmp_path_factory.mktemp("source") / "stack.tif"
    write_tiff(path, demo_stack(SHAPE, seed=3)[1].stack, VOXEL)
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> Path:
    """The local alignment of ``source``: what the S3 runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    ok("align", source, out, *ALIGN)
    return out


@pytest.fixture(scope="module")
def s3_input(s3, source) -> str:
    """``source`` imported into the S3 bucket as OME-Zarr (``emalign import`` writing to a URL)."""
    url = f"s3://{BUCKET}/input.zarr"
    ok("import", source, url, "--chunk", "64")
    return url


def test_import_to_s3_writes_the_data_and_voxel_size_of_the_input(s3, s3_input, source):
    _, fs = s3
    assert fs.exists(f"{BUCKET}/input.zarr/zarr.json")
    stack = open_stack(s3_input)
    np.testing.assert_array_equal(np.asarray(stack.data), np.asarray(open_stack(source).data))
    assert stack.voxel_size == pytest.approx(VOXEL) and stack.unit == "nanometer"
    assert is_complete(s3_input)


def test_a_stage_then_align_from_and_to_s3_resumes_to_the_local_result(s3, s3_input, reference):
    _, fs = s3
    out = f"s3://{BUCKET}/resumed.zarr"
    ok("prealign", s3_input, out, *ALIGN)
    assert not is_complete(out)
    assert fs.exists(f"{BUCKET}/resumed.zarr/stages/prealign/0")  # the stage markers live in S3
    assert np.asarray(zarr.open_group(stores.zarr_store(out), mode="r")["stages/prealign"][:]).all()
    result = ok("align", s3_input, out, *ALIGN)
    assert f"QC: {out}/qc.csv, {out}/qc.png" in result.output
    assert is_complete(out)
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(global_fields(out), global_fields(reference))
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/resumed.zarr/qc.csv") == (reference / "qc.csv").read_bytes()
    aligned = open_stack(out)
    assert aligned.voxel_size == pytest.approx(VOXEL)
    attrs = zarr.open_group(stores.zarr_store(out), mode="r").attrs["emalign"]
    assert attrs["input"]["path"] == s3_input
    assert "testing" not in str(attrs)  # the credentials are nowhere in the recorded parameters


def test_the_model_file_of_an_s3_output_is_made_locally_copied_to_s3_and_fetched_where_missing(s3, s3_input):
    _, fs = s3
    out = f"s3://{BUCKET}/files.zarr"
    ok("prealign", s3_input, out, *ALIGN)
    ws = Workspace(out)
    assert ws.files == stores.work_folder(out) and ws.files.is_relative_to(os.environ[stores.WORK_ENV])
    model = ws.adapted_model_path
    model.write_bytes(b"adapted weights")
    ws.publish(model)
    assert fs.cat_file(f"{BUCKET}/files.zarr/model/adapted.pt") == b"adapted weights"
    model.unlink()  # another machine: no local copy
    ws.params = dataclasses.replace(ws.params, adapt=5)
    assert Path(ws.model).read_bytes() == b"adapted weights"


def test_a_killed_align_on_s3_resumes_to_the_uninterrupted_result(s3, s3_input, reference):
    """``emalign align`` in a subprocess, SIGKILLed once estimate has finished a block in S3, then rerun."""
    _, fs = s3
    out = f"s3://{BUCKET}/killed.zarr"
    command = [sys.executable, "-m", "emalign.cli", "align", s3_input, out, *ALIGN, "--scheduler", "threads:2"]
    markers = f"{BUCKET}/killed.zarr/stages/estimate"

    def an_estimate_block_done() -> bool:
        fs.invalidate_cache()
        return fs.exists(markers) and any(key.rsplit("/", 1)[-1].isdigit() for key in fs.ls(markers))

    kill_when(command, an_estimate_block_done, poll=0.05)
    assert not is_complete(out)
    ok("align", s3_input, out, *ALIGN)
    assert is_complete(out)
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(global_fields(out), global_fields(reference))


def test_missing_bucket_missing_input_bad_scheme_and_read_only_http_are_one_line_errors(s3, s3_input, source):
    assert "bucket 'no-such-bucket' does not exist" in error_line("align", "s3://no-such-bucket/in.zarr", "x.zarr")
    assert "bucket 'no-such-bucket' does not exist" in error_line("import", source, "s3://no-such-bucket/out.zarr")
    assert f"s3://{BUCKET}/missing.zarr: does not exist" in error_line("align", f"s3://{BUCKET}/missing.zarr", "x")
    assert "Protocol not known: nosuch" in error_line("import", "nosuch://host/in.zarr", "x.zarr")
    assert "s3://: names no bucket" in error_line("align", "s3://", "x.zarr")
    assert "Invalid bucket name" in error_line("align", "s3://Bad_Bucket!/in.zarr", "x.zarr")
    assert "URLs are read-only" in error_line("import", source, "http://127.0.0.1:9/out.zarr")


def test_denied_access_to_s3_is_a_one_line_error(s3, s3_input):
    endpoint, _ = s3

    def reset(count: bytes) -> None:
        """After ``count`` more requests the server checks credentials (ours belong to no user)."""
        headers = {"Content-Type": "text/plain"}
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", count, headers))

    reset(b"0")
    try:
        line = error_line("align", s3_input, f"s3://{BUCKET}/denied.zarr", *ALIGN)
    finally:
        reset(b"inf")
    assert s3_input in line and "access denied" in line


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A local ``http.server`` on 127.0.0.1 serving a folder; yields ``(folder, base URL)``."""
    folder = tmp_path_factory.mktemp("served")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_an_ome_zarr_served_over_http_reads_like_the_local_copy(http_root, source, ngff):
    folder, base = http_root
    import_stack(source, folder / f"v{ngff}.zarr", (1, 64, 64), levels=2, progress=False, ngff=ngff)
    local, served = open_stack(folder / f"v{ngff}.zarr", level=1), open_stack(f"{base}/v{ngff}.zarr", level=1)
    np.testing.assert_array_equal(np.asarray(served.data), np.asarray(local.data))
    assert (served.voxel_size, served.unit) == (local.voxel_size, local.unit)
    assert served.voxel_size == pytest.approx((40.0, 16.0, 16.0))
    assert stores.absolute(f"{base.replace('//', '//user:secret@')}/v{ngff}.zarr/") == f"{base}/v{ngff}.zarr"


def test_neuroglancer_gets_an_s3_output_as_its_url_with_nothing_served(s3, s3_input):
    from emalign.neuroglancer import start

    server, _, state = start(s3_input)
    server.shutdown()
    server.server_close()
    assert [layer["source"] for layer in state["layers"]] == [f"zarr://{s3_input}/"]
    assert state["dimensions"]["z"] == [pytest.approx(40e-9), "m"]


def test_file_urls_are_local_paths(source, tmp_path):
    out = tmp_path / "imported.zarr"
    ok("import", f"file://{source}", f"file://{out}", "--chunk", "64")
    assert is_complete(out) and open_stack(f"file://{out}").voxel_size == pytest.approx(VOXEL)
    assert zarr.open_group(str(out), mode="r").attrs["emalign"]["params"]["src"] == str(source)
