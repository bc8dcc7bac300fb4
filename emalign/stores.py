"""Inputs and outputs given as fsspec URLs (``s3://``, ``gs://``, ``https://`` read-only) or local paths.

Zarr reads and writes a URL through its own fsspec store (:class:`zarr.storage.FsspecStore`); credentials and
endpoints come from each backend's usual environment and configuration (s3fs: ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``~/.aws/credentials``, ``AWS_ENDPOINT_URL``; gcsfs: Google application default credentials;
fsspec's own ``~/.config/fsspec/*.json`` or ``FSSPEC_S3_ENDPOINT_URL``-style variables), never from emalign's
parameters: a URL is recorded without any ``user:password@`` part. ``file://`` URLs are local paths.

An alignment written to a URL keeps everything Zarr holds there (levels, ``done``, the pipeline's arrays and the
stage markers, one chunk per task as on a local disk, so a killed run resumes from the object store). Its few
non-Zarr files (``qc.csv``, ``qc.png``, the ``--adapt`` model and its training run) are made in a local work
folder (:func:`work_folder`) and copied to the URL once written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from emalign.errors import EmalignError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
READ_ONLY = ("http", "https")
"""URL schemes emalign reads but never writes."""
WORK_ENV = "EMALIGN_WORK"
"""Environment variable naming the local folder under which URL outputs get their work folders."""
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
STORAGE_OPTIONS = {"s3": {"max_concurrency": 1}}
"""fsspec options emalign sets per scheme, none of them credentials: s3fs reads a Zarr chunk in one GET instead
of asking its size first (a chunk is far too small for a concurrent multipart read)."""


def _error(url: str, problem: str) -> EmalignError:
    return EmalignError(" ".join(f"{url}: {problem}".split()))


def _reason(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (the message's lines joined, at most 200 characters)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def is_url(path: str | os.PathLike) -> bool:
    """True for a URL that fsspec opens (``s3://``, ``gs://``, ``https://``, ...); False for a local path or a
    ``file://`` URL."""
    found = _SCHEME.match(str(path)) if isinstance(path, str) else None
    return found is not None and found.group(1).lower() != "file"


def local(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` with a leading ``file://`` removed (other paths unchanged)."""
    return path[len("file://") :] if isinstance(path, str) and path.lower().startswith("file://") else path


def absolute(path: str | os.PathLike) -> str:
    """What the parameters record: a URL without credentials or trailing '/', or the absolute local path."""
    if not is_url(path):
        return os.path.abspath(local(path))
    parts = urlsplit(str(path))
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=netloc)).rstrip("/")


def join(path: str | os.PathLike, *names: str) -> str:
    """``path/names...`` for a URL or a local path."""
    if is_url(path):
        return "/".join([str(path).rstrip("/"), *names])
    return os.path.join(local(path), *names)


@contextlib.contextmanager
def remote(url: str, action: str = "read") -> Iterator[None]:
    """Turn what a remote store raises (missing bucket or object, denied access, unknown scheme, no backend,
    unreachable server) into a one-line EmalignError naming ``url``."""
    try:
        yield
    except EmalignError:
        raise
    except ImportError as exc:
        raise _error(url, f"cannot {action} this URL: {exc} (pip install 'emalign[remote]')") from None
    except PermissionError as exc:
        raise _error(url, f"access denied ({_reason(exc)}); check the credentials of this store") from None
    except FileNotFoundError as exc:
        raise _error(url, f"does not exist ({_reason(exc)})") from None
    except Exception as exc:
        raise _error(url, f"cannot {action} it ({_reason(exc)})") from None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path in it."""
    import fsspec

    with remote(url):
        return fsspec.url_to_fs(url)


def zarr_store(path: str | os.PathLike, writable: bool = False) -> Any:
    """What ``zarr.open*`` takes for ``path``: an :class:`zarr.storage.FsspecStore` for a URL, else the path."""
    if not is_url(path):
        return str(local(path))
    from zarr.storage import FsspecStore

    options = STORAGE_OPTIONS.get(urlsplit(str(path)).scheme.lower())
    with remote(path):
        return FsspecStore.from_url(str(path), storage_options=options, read_only=not writable)


def exists(path: str | os.PathLike) -> bool:
    """True if a file, folder or object prefix is at ``path``; a missing bucket says so in an EmalignError."""
    if not is_url(path):
        return Path(local(path)).exists()
    fs, key = filesystem(path)
    if not key.strip("/"):
        raise _error(path, "names no bucket, host or object")
    with remote(path):
        if fs.exists(key):
            return True
        bucket = key.split("/", 1)[0]
        if urlsplit(str(path)).scheme not in READ_ONLY and bucket != key and not fs.exists(bucket):
            raise _error(path, f"bucket {bucket!r} does not exist (or these credentials cannot see it)")
        return False


def is_zarr(path: str | os.PathLike) -> bool:
    """True if ``path`` holds Zarr (v2 or v3) metadata at its top."""
    if not is_url(path):
        folder = Path(local(path))
        return folder.is_dir() and any((folder / marker).exists() for marker in _ZARR_MARKERS)
    fs, key = filesystem(path)
    with remote(path):
        return any(fs.exists(f"{key.rstrip('/')}/{marker}") for marker in _ZARR_MARKERS)


def is_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is one file or object (not a folder or prefix)."""
    if not is_url(path):
        return Path(local(path)).is_file()
    fs, key = filesystem(path)
    with remote(path):
        return fs.isfile(key)


def is_empty(path: str | os.PathLike) -> bool:
    """True if nothing is stored under ``path`` (or it does not exist)."""
    if not is_url(path):
        folder = Path(local(path))
        return not folder.exists() or not any(folder.iterdir())
    fs, key = filesystem(path)
    with remote(path):
        return not fs.exists(key) or not fs.ls(key)


def remove(path: str | os.PathLike) -> None:
    """Delete the folder ``path``, or everything under the URL ``path`` (nothing there: nothing done)."""
    if not is_url(path):
        if Path(local(path)).exists():
            shutil.rmtree(local(path))
        return
    fs, key = filesystem(path)
    with remote(path, "delete"):
        if fs.exists(key):
            fs.rm(key, recursive=True)


def check_writable(url: str) -> None:
    """Raise EmalignError unless an object can be written (and removed) under ``url``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in READ_ONLY:
        raise _error(url, f"{scheme}:// URLs are read-only; write the output to a local folder, s3:// or gs://")
    exists(url)  # a missing bucket says so
    fs, key = filesystem(url)
    probe = f"{key.rstrip('/')}/.emalign-write-test-{os.getpid()}"
    with remote(url, "write"):
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)


def work_folder(url: str) -> Path:
    """The local folder of the non-Zarr files of the output at ``url``: ``$EMALIGN_WORK`` (default
    ``~/.cache/emalign/work``) / a hash of the URL; made if missing."""
    root = Path(os.environ.get(WORK_ENV) or Path.home() / ".cache" / "emalign" / "work")
    folder = root / hashlib.sha256(absolute(url).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def upload(file: str | os.PathLike, url: str) -> None:
    """Copy the local ``file`` to ``url`` (replacing it)."""
    fs, key = filesystem(url)
    with remote(url, "write"):
        fs.put_file(str(file), key)


def download(url: str, file: str | os.PathLike) -> bool:
    """Copy ``url`` to the local ``file``; False (nothing copied) when there is no such object."""
    fs, key = filesystem(url)
    with remote(url):
        if not fs.isfile(key):
            return False
        fs.get_file(key, str(file))
    return True
