"""The settings of a training run of the serial networks (:mod:`emalign.train`), torch-free.

Its fields made by :func:`emalign.options.param` are the options of ``emalign train`` (same name, default and help);
the rest are set from Python (as :mod:`emalign.pipeline.adapt` does) or kept at their defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from emalign.options import DEFAULT_MODEL, param


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint as :meth:`to_dict`).

    The defaults of ``batch``, ``crop`` and ``lr`` are those ``faemreg-small`` was first trained with from scratch
    (its model card's stage 1).

    Attributes (those that are no option):
        procedural_shape: ``(Z, Y, X)`` of each procedural volume.
        same_section_start, same_section_end: fraction of same-section windows (every reference a copy of the
            moving section) at the first step and from half the steps on (linear in between): the curriculum.
        symmetric_fraction: fraction of windows with references on both sides (the rest mirrored, one side).
        shift, rotation_deg, scale: standard deviations of the moving section's rigid misalignment (px, degrees,
            relative scale).
        elastic, elastic_length: the moving section's smooth warp, RMS up to ``1.5 * elastic`` px, correlation
            length drawn from the range, px.
        reference_jitter: RMS (px) of each reference's own smooth warp.
        blank_reference: probability that a window has one reference blanked (a lost section).
        val_windows, val_z_step: validation windows, and their section spacing.
        extra: free-form metadata kept with the settings.
    """

    model: str = param(DEFAULT_MODEL, "architecture, or a .pt to fine-tune")
    data: tuple[str, ...] = param((), "aligned stack(s) to train on (TIFF/Zarr); repeatable", multiple=True)
    val_data: tuple[str, ...] = param((), "aligned stack(s) for validation (default: procedural)", multiple=True)
    procedural: int = param(2, "procedural EM-like volumes to add")
    procedural_shape: tuple[int, int, int] = (40, 256, 256)
    z_steps: tuple[int, ...] = param(
        (1, 2, 3, 4, 5, 6), "section spacings to sample", expect="comma-separated section spacings, e.g. 1,2,4"
    )
    same_section_start: float = 0.5
    same_section_end: float = 0.05
    symmetric_fraction: float = 0.5
    steps: int = param(1000, "training steps")
    minutes: float = param(0.0, "wall-clock budget, minutes: the step count is fitted to it (0: --steps)")
    batch: int = param(6, "windows per step")
    crop: int = param(144, "training crop, px")
    lr: float = param(1e-3, "learning rate (AdamW, cosine schedule)")
    supervised_weight: float = param(1.0, "weight of the exact synthetic target")
    similarity_weight: float = param(0.0, "weight of the local-NCC loss")
    smooth_weight: float = param(0.05, "weight of the smoothness loss")
    shift: float = 3.0
    rotation_deg: float = 0.7
    scale: float = 0.005
    elastic: float = 2.0
    elastic_length: tuple[float, float] = (40.0, 160.0)
    reference_jitter: float = 0.4
    blank_reference: float = 0.1
    val_every: int = param(100, "steps between validations (and checkpoints)")
    val_windows: int = 32
    val_z_step: int = 4
    seed: int = param(0, "random seed")
    device: str = param("auto", "auto, cpu or cuda")
    teacher: str = param("", "a trained model (name or .pt) to distil from (fields and features)")
    distill_weight: float = param(1.0, "weight of the distillation loss")
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
