"""``emalign volume``: train and apply the volumetric (3D pairwise) networks SDHNet, RDN and CRD.

``emalign volume register --fixed F --moving M --out OUT [--field FIELD]`` registers two volumes
(TIFF/Zarr/OME-Zarr) and writes the moving volume on the fixed grid as OME-Zarr plus the pull
field; ``emalign volume train --out DIR`` trains a network on pairs made by known smooth
deformations of aligned volumes. Heavy imports stay inside the commands so ``emalign --help`` is fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from emalign.cli_errors import friendly
from emalign.cli_options import config_from_options, field_options
from emalign.errors import EmalignError
from emalign.options import DEFAULT_VOLUME_MODEL, option_fields
from emalign.volume_train_config import VolumeTrainConfig


@click.group(name="volume")
def volume() -> None:
    """3D pairwise registration of isotropic volumes (SDHNet, RDN, CRD)."""


@volume.command()
@click.option("--fixed", "fixed_path", required=True, help="fixed volume (TIFF/Zarr/OME-Zarr)")
@click.option("--moving", "moving_path", required=True, help="moving volume, registered onto the fixed one")
@click.option("--out", "out_path", required=True, help="output OME-Zarr (the moving volume on the fixed grid)")
@click.option("--field", "field_path", default=None, help="where to write the pull field (default: OUT/field)")
@click.option("--model", default=DEFAULT_VOLUME_MODEL, show_default=True, help="shipped name or .pt checkpoint")
@click.option("--patch", default=96, show_default=True, help="patch side for inference, voxels")
@click.option("--overlap", default=32, show_default=True, help="overlap of neighbouring patches, voxels")
@click.option("--affine/--no-affine", default=True, show_default=True, help="classical affine pre-alignment first")
@click.option("--moving-labels", default=None, help="labels of the moving volume: warped (nearest) into OUT/labels")
@click.option("--fixed-labels", default=None, help="labels of the fixed volume: report Dice before/after")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT")
@click.option("--quiet", is_flag=True, help="no progress bars")
@friendly
def register(
    fixed_path: str,
    moving_path: str,
    out_path: str,
    field_path: str | None,
    model: str,
    patch: int,
    overlap: int,
    affine: bool,
    moving_labels: str | None,
    fixed_labels: str | None,
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Register MOVING onto FIXED; write OUT (OME-Zarr) and the pull field."""
    from emalign.device import resolve_device
    from emalign.volumetric.infer import register_files

    resolve_device(device)
    if fixed_labels and not moving_labels:
        raise EmalignError("--fixed-labels needs --moving-labels (the labels to warp and compare)")
    summary = register_files(
        fixed_path,
        moving_path,
        out_path,
        field_path,
        model,
        patch,
        overlap,
        device,
        affine,
        moving_labels,
        fixed_labels,
        overwrite,
        not quiet,
    )
    line = (
        f"registered {moving_path} onto {fixed_path} {tuple(summary['shape'])} in {summary['seconds']:.1f}s: "
        f"mean displacement {summary['mean_displacement']:.2f} vox (max {summary['max_displacement']:.2f}), "
        f"folding {summary['folding_percent']:.3f}%"
    )
    if "dice_after" in summary:
        line += f", Dice {summary['dice_before']:.3f} -> {summary['dice_after']:.3f}"
    click.echo(line)
    click.echo(f"warped OME-Zarr: {out_path}; field: {summary['field']}")


def _train_options(func):
    """The options of ``emalign volume train``: the :class:`emalign.volume_train_config.VolumeTrainConfig` fields."""
    return field_options(func, option_fields(VolumeTrainConfig).values())


@volume.command()
@click.option("--out", "out_dir", required=True, help="folder for checkpoints (best.pt, last.pt, history.json)")
@_train_options
@click.option("--threads", default=0, show_default=True, help="torch CPU threads (0: torch's default)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@friendly
def train(out_dir: str, quiet: bool, threads: int, **opts) -> None:
    """Train a volumetric network on pairs made by known smooth deformations (unsupervised loss by default)."""
    import torch

    from emalign.volumetric.train import train as run_train

    if threads:
        torch.set_num_threads(threads)
    history = run_train(config_from_options(VolumeTrainConfig, opts), out_dir, progress=not quiet)
    click.echo(
        f"validation end-point error: {history['val_epe'][0]:.3f} -> {min(history['val_epe']):.3f} voxels "
        f"(no registration: {history['val_epe_identity'][-1]:.3f}); best checkpoint: {Path(out_dir) / 'best.pt'}"
    )
