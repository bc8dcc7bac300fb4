"""Helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tifffile
from click.testing import CliRunner, Result

from emalign.cli import main
from emalign.errors import EmalignError
from emalign.synth import demo_stack


def entry_point() -> str:
    """The installed `emalign` script of this interpreter's environment."""
    found = shutil.which("emalign", path=str(Path(sys.executable).parent)) or shutil.which("emalign")
    assert found, "the `emalign` entry point is not installed"
    return found


def invoke(*args: object) -> Result:
    """``emalign ARGS`` run in this process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object) -> Result:
    """``emalign ARGS`` run in this process; fails the test unless it exits 0."""
    result = invoke(*args)
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}\n{result.stderr}"
    return result


def kill_when(
    command: list[str], ready: Callable[[], bool], after: float = 0.0, env: dict | None = None, poll: float = 0.005
) -> str:
    """Start ``command``, SIGKILL it ``after`` s once ``ready()`` holds (or after 120 s); fails the test if it ended
    by itself; returns its stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(poll)
        time.sleep(after)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself ({process.returncode}): {stderr}"
    return stderr


def write_stack(folder: Path, shape: tuple[int, int, int], seed: int) -> Path:
    """A misaligned synthetic stack (:func:`emalign.synth.demo_stack`) written as ``folder/stack.tif``."""
    path = folder / "stack.tif"
    tifffile.imwrite(path, demo_stack(shape, seed=seed)[1].stack, photometric="minisblack")
    return path


def one_line_error(path, func, *args, match: str | None = None, **kwargs) -> str:
    """Call func, expect an EmalignError whose message is one line naming `path`; return the message."""
    with pytest.raises(EmalignError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@contextlib.contextmanager
def mounted(point: Path, *how: str):
    """``mount *how point`` (needs root; skips otherwise), lazily unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    point.mkdir(exist_ok=True)
    done = subprocess.run(["mount", *how, str(point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
