"""Rendering: a region is warped in row strips of bounded size, each reading only the raw pixels it pulls from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from emalign.fields import affine_field
from emalign.pipeline import render
from emalign.synth import em_texture


def test_a_region_warped_in_row_strips_equals_it_warped_at_once_and_reads_only_what_each_strip_pulls(monkeypatch):
    section = em_texture((1, 200, 160), seed=4)[0].astype(np.float32)
    stack = SimpleNamespace(shape=(1, *section.shape))
    turn = np.array([[0.99, -0.05, 6.0], [0.05, 0.99, -4.0]])  # a slight rotation and shift, pull
    field = affine_field(turn, (26, 21), stride=8)
    reads = []

    def read(_stack, _z, region):
        reads.append(region)
        return section[region]

    at_once = render.render_region(stack, 0, field, 8, (20, 10), (150, 120), read)
    monkeypatch.setattr(render, "RENDER_PIXELS", 40 * 120)  # strips of 40 rows, the last of 30
    reads.clear()
    in_strips = render.render_region(stack, 0, field, 8, (20, 10), (150, 120), read)
    assert len(reads) == 4 and all(r[0].stop - r[0].start < 60 for r in reads)
    assert np.abs(in_strips - at_once).max() < 1e-3
