"""The settings of a training run of the volumetric networks (:mod:`emalign.volumetric.train`), torch-free.

Its fields are the options of ``emalign volume train`` (same name, default and help), made by
:func:`emalign.options.param`. Outside :mod:`emalign.volumetric`, whose package imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from emalign.options import DEFAULT_VOLUME_MODEL, param


@dataclass
class VolumeTrainConfig:
    """Everything that defines a training run (saved in every checkpoint as :meth:`to_dict`)."""

    model: str = param(DEFAULT_VOLUME_MODEL, "architecture name, or a .pt to fine-tune")
    data: tuple[str, ...] = param(
        (), "aligned volume(s) to cut training pairs from (TIFF/Zarr); repeatable", multiple=True
    )
    labels: tuple[str, ...] = param((), "label volume(s) matching --data (enables the Dice term)", multiple=True)
    val_data: tuple[str, ...] = param((), "aligned volume(s) for validation (default: procedural)", multiple=True)
    procedural: int = param(2, "procedural EM-like volumes (with labels) to add")
    procedural_size: int = param(96, "side of the procedural volumes, voxels")
    steps: int = param(300, "steps (per CRD stage)")
    distill_steps: int | None = param(None, "CRD: steps of the distillation stage (default --steps)", type=int)
    teacher: str | None = param(None, "CRD: a trained feature-shifted teacher (.pt) to distil from")
    student_init: str | None = param(None, "CRD: a pre-trained low-resolution model (.pt) to start from")
    batch: int = param(2, "pairs per step")
    crop: int = param(48, "training pair side, voxels")
    lr: float = param(1e-3, "learning rate (Adam, cosine schedule)")
    similarity: str = param("lncc", "similarity loss: local NCC or global Pearson", choices=("lncc", "pearson"))
    smooth_weight: float = param(0.5, "weight of the smoothness loss")
    supervised_weight: float = param(0.0, "weight of the known-field end-point error")
    dice_weight: float = param(0.0, "weight of the soft label Dice (needs labels)")
    distill_weight: float = param(0.1, "SDHNet: self-distillation weight")
    shift: float = param(2.0, "std of the random translation, voxels")
    rotation: float = param(2.0, "std of the random rotation per axis, degrees")
    scale: float = param(0.02, "std of the random scale change")
    elastic: float = param(2.0, "RMS of the elastic deformation, voxels")
    correlation: float = param(14.0, "correlation length of the elastic part, voxels")
    noise: float = param(0.1, "noise added to each volume, in its standard deviations")
    val_pairs: int = param(6, "validation pairs")
    val_every: int = param(50, "steps between validations (and checkpoints)")
    seed: int = param(0, "random seed")
    device: str = param("auto", "auto, cpu or cuda")

    def to_dict(self) -> dict:
        return asdict(self)
