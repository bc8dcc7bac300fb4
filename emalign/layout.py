"""The output layouts the writer offers, as plain constants (no Zarr import: the CLI reads them for its options)."""

from __future__ import annotations

NGFF_VERSIONS = ("0.5", "0.4")
"""What the writer makes: NGFF 0.5 on Zarr v3 (default, sharded levels) or NGFF 0.4 on Zarr v2 (older readers)."""
SHARD_XY = 4096
"""Default y/x side (px) of one shard (one file) of an NGFF 0.5 level; shards are one chunk deep in z."""
