"""OME-NGFF image metadata of emalign's outputs, built and validated by ome-zarr-models (NGFF 0.5 or 0.4).

Level ``l`` of a pyramid halves y and x ``l`` times (2x2 means, z kept): its scale is
``(vz, vy * 2**l, vx * 2**l)`` in ``unit`` and its translation ``(0, (2**l - 1) / 2 * vy, (2**l - 1) / 2 * vx)``,
so a coarse pixel's centre sits at the centre of the full-resolution pixels it averages.
"""

from __future__ import annotations

from collections.abc import Sequence

from emalign.errors import EmalignError

AXES = ("z", "y", "x")
DOWNSAMPLING = {"method": "emalign.io.downsample2", "description": "2x2 mean in y, x; z never downsampled"}


def image_attrs(
    name: str, voxel_size: Sequence[float], unit: str, levels: int, ngff: str, where: str = "output"
) -> dict:
    """The group attributes of an NGFF ``ngff`` ("0.5": ``{"ome": {...}}``, "0.4": ``{"multiscales": [...]}``)
    image of ``levels`` 2x pyramid levels named "0", "1", ...; ``voxel_size`` (z, y, x) of level 0 in ``unit``.

    A value the NGFF schema refuses (e.g. an unknown unit) raises EmalignError naming ``where``."""
    import pydantic

    if ngff == "0.5":
        from ome_zarr_models.v05.axes import Axis
        from ome_zarr_models.v05.image import ImageAttrs
        from ome_zarr_models.v05.multiscales import Dataset, Multiscale
    else:
        from ome_zarr_models.v04.axes import Axis
        from ome_zarr_models.v04.image import ImageAttrs
        from ome_zarr_models.v04.multiscales import Dataset, Multiscale
    vz, vy, vx = (float(v) for v in voxel_size)
    datasets = [
        Dataset.build(
            path=str(level),
            scale=[vz, vy * 2**level, vx * 2**level],
            translation=[0.0, (2**level - 1) / 2 * vy, (2**level - 1) / 2 * vx],
        )
        for level in range(levels)
    ]
    try:
        multiscale = Multiscale(
            axes=[Axis(name=axis, type="space", unit=unit) for axis in AXES],
            datasets=datasets,
            name=name,
            type="mean",
            metadata=DOWNSAMPLING,
            **({"version": ngff} if ngff == "0.4" else {}),
        )
        attrs = ImageAttrs(multiscales=[multiscale], **({"version": ngff} if ngff == "0.5" else {}))
    except pydantic.ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:2])
        raise EmalignError(f"{where}: NGFF {ngff} metadata refused ({problem})") from None
    dumped = attrs.model_dump(mode="json", exclude_none=True)
    return {"ome": dumped} if ngff == "0.5" else dumped
