"""Pixel size: where it comes from, whether it is plausible, and the working resolution it sets.

The shipped networks were trained on 10 nm pixels (:data:`TRAINING_PIXEL_NM`). A stack with finer pixels
is aligned on its block means by an integer ``factor`` (5 nm -> 2: the same physical resolution as the
training data; the input's own pyramid level is used where it exists), and what the integer factor leaves
(``ratio``: working pixel / training pixel, e.g. 0.8 at 4 nm) scales the network's input and the
pipeline's length parameters, whose defaults are meant for 10 nm pixels. Fields are estimated at the
working resolution and rendered at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from emalign.errors import EmalignError

TRAINING_PIXEL_NM = 10.0
"""Pixel size of the data the shipped networks were trained on (FlyEM FIB-SEM)."""
PLAUSIBLE_NM = (0.5, 1000.0)
"""Pixel sizes (nm) accepted from metadata or the user; anything else is refused as a wrong unit or value."""
PLACEHOLDER = 1.0
"""A pixel size of exactly 1 (any unit) in metadata is a writer's default, not a measurement: it is
estimated from the data instead."""
NANOMETRES = {
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "um": 1e3,
    "\u00b5m": 1e3,
    "millimeter": 1e6,
    "mm": 1e6,
    "meter": 1e9,
    "m": 1e9,
    "angstrom": 0.1,
}
"""Length units (OME-NGFF names and their abbreviations) in nm."""
TEXTURE_WIDTH_AT_TRAINING = 6.0
"""Half-width (px) of the autocorrelation of FlyEM sections at 10 nm (:func:`texture_width`: 5.7-6.4 on sample 2)."""
ESTIMATE_CROP = 1024
"""Side (px) of the central crop whose texture the pixel-size estimate reads (bounded memory at any size)."""


@dataclass(frozen=True)
class Resolution:
    """How a stack is aligned: its pixel size and the working resolution derived from it.

    Attributes:
        pixel_nm: the input's pixel size (y and x), nm.
        source: ``"user"`` (``--voxel-size``), ``"metadata"`` or ``"estimated"`` (:func:`estimate_pixel_size`).
        factor: integer block-mean factor from the input to the working resolution (1: the input itself).
        ratio: working pixel size / :data:`TRAINING_PIXEL_NM` (1 when the factor alone reaches it).
    """

    pixel_nm: float
    source: str
    factor: int = 1
    ratio: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Resolution:
        return cls(**data)

    def describe(self) -> str:
        """One line: the pixel size, where it came from, and the working resolution."""
        origin = {"user": "from --voxel-size", "metadata": "from the input's metadata"}.get(
            self.source, "not in the metadata: estimated from the texture scale (pass --voxel-size to set it)"
        )
        working = self.pixel_nm * self.factor
        scale = f", network input scaled by {self.ratio:.2f}" if self.ratio != 1.0 else ""
        return (
            f"pixel size {self.pixel_nm:.3g} nm ({origin}); aligning at {self.factor}x block means "
            f"({working:.3g} nm pixels{scale})"
        )


def to_nanometres(value: float, unit: str) -> float:
    """``value`` in ``unit`` (an OME-NGFF unit name) as nm; unknown units raise :class:`EmalignError`."""
    factor = NANOMETRES.get(str(unit).strip().lower())
    if factor is None:
        raise EmalignError(f"unit {unit!r} is not a length unit emalign knows ({', '.join(NANOMETRES)})")
    return float(value) * factor


def check_pixel_size(pixel_nm: float, where: str) -> float:
    """``pixel_nm`` if it is a plausible EM pixel size, else a one-line error naming ``where``."""
    lo, hi = PLAUSIBLE_NM
    if not math.isfinite(pixel_nm) or not lo <= pixel_nm <= hi:
        raise EmalignError(
            f"{where}: pixel size {pixel_nm:g} nm is not plausible for EM (expected {lo:g}-{hi:g} nm); "
            "give the right one with --voxel-size Z,Y,X --unit nanometer"
        )
    return pixel_nm


def check_spacings(voxel_size: tuple[float, ...], unit: str, where: str) -> None:
    """A one-line error naming ``where`` unless every spacing of ``voxel_size`` (z, y, x) is a positive number."""
    if not all(math.isfinite(v) and v > 0 for v in voxel_size):
        text = ",".join(f"{v:g}" for v in voxel_size)
        raise EmalignError(f"{where}: voxel size {text} {unit}: every spacing must be a positive number")


def working_resolution(pixel_nm: float, source: str) -> Resolution:
    """The :class:`Resolution` of a stack with ``pixel_nm`` pixels: the integer factor nearest to the
    training pixel size (never upsampling), and the ratio it leaves. An estimated size sets the factor
    only (ratio 1): the estimate is too coarse to scale the network by."""
    factor = max(1, round(TRAINING_PIXEL_NM / pixel_nm))
    ratio = 1.0 if source == "estimated" else pixel_nm * factor / TRAINING_PIXEL_NM
    return Resolution(pixel_nm=pixel_nm, source=source, factor=factor, ratio=round(ratio, 6))


def texture_width(section: np.ndarray, iterations: int = 4) -> float:
    """Half-width (px) at which the radial autocorrelation of a ``(Y, X)`` section falls to 0.5.

    Pixel noise (the zero-lag spike) is left out by extrapolating lags 1 and 2 to lag 0, and slow shading is
    removed by a Gaussian high-pass of 4x the width found so far, so the width scales with the pixel size.
    Zeros (no data) count as the section's mean. Returns NaN for a featureless section.
    """
    image = section.astype(np.float64)
    valid = image != 0
    if valid.mean() < 0.5 or image[valid].std() == 0:
        return float("nan")
    image[~valid] = image[valid].mean()
    radius = np.hypot(
        *np.meshgrid(
            np.fft.fftfreq(image.shape[0]) * image.shape[0],
            np.fft.fftfreq(image.shape[1]) * image.shape[1],
            indexing="ij",
        )
    )
    bins = np.rint(radius).astype(int).ravel()
    counts = np.bincount(bins)
    width = 5.0
    for _ in range(iterations):
        detail = image - ndimage.gaussian_filter(image, 4 * width)
        detail -= detail.mean()
        acf = np.fft.irfft2(np.abs(np.fft.rfft2(detail)) ** 2, s=detail.shape)
        profile = np.bincount(bins, acf.ravel()) / np.maximum(counts, 1)
        profile = profile / (2 * profile[1] - profile[2])
        below = np.flatnonzero(profile[1:] < 0.5)
        if not below.size:
            return float("nan")
        i = int(below[0]) + 1
        width = i - 1 + (profile[i - 1] - 0.5) / (profile[i - 1] - profile[i])
    return float(width)


def estimate_pixel_size(sections: list[np.ndarray]) -> float:
    """Pixel size (nm) of EM ``sections`` (a few ``(Y, X)`` central crops) from their texture scale, against
    FlyEM's at 10 nm (:data:`TEXTURE_WIDTH_AT_TRAINING`).

    A rough guide, right within ~15 % on FlyEM resampled to 4-20 nm; sharper modalities (ssTEM) read as
    coarser than they are, so an estimate errs towards aligning at the input's own resolution.
    """
    widths = [w for w in (texture_width(s) for s in sections) if math.isfinite(w)]
    if not widths:
        return TRAINING_PIXEL_NM
    return TRAINING_PIXEL_NM * TEXTURE_WIDTH_AT_TRAINING / float(np.median(widths))
