"""The ``emalign`` command: one click command per stage, plus align, demo, import and train.

Every stage takes the same ``IN OUT`` and options as ``align`` (the first to run creates
OUT, later ones check that the parameters agree) and ``--z-range START:STOP``, so a cluster
workflow can fan the stages out. Bad input ends with a one-line ``error: ...`` and exit 2.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from emalign.cli_errors import friendly
from emalign.device import reuse_freed_memory
from emalign.errors import EmalignError
from emalign.volumetric.cli import volume

MODEL_HELP = "shipped model name or .pt checkpoint"


def _layout_options(func):
    """The output layout: NGFF version and shard size (align, every stage, import)."""
    from emalign.io import NGFF_VERSIONS, SHARD_XY

    options = [
        click.option(
            "--ngff",
            default=NGFF_VERSIONS[0],
            show_default=True,
            type=click.Choice(NGFF_VERSIONS),
            help="output layout: 0.5 (Zarr v3, sharded) or 0.4 (Zarr v2, for older readers)",
        ),
        click.option(
            "--shard",
            default=SHARD_XY,
            show_default=True,
            help="y/x side of a shard (file) of the 0.5 output, px; 0: none",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _plan_options(func):
    """The options that define an alignment (recorded in the output)."""
    options = [
        click.option("--model", default="faemreg-small", show_default=True, help=MODEL_HELP),
        click.option("--stride", default=8, show_default=True, help="field grid spacing, px"),
        click.option("--block", default=16, show_default=True, help="sections per task"),
        click.option("--stitch-block", default=128, show_default=True, help="sections per stitch solve"),
        click.option("--stitch-overlap", default=32, show_default=True, help="overlap of stitch solves"),
        click.option("--spring", default=0.2, show_default=True, help="stitch pull towards the prealignment"),
        click.option("--smoothing", default=16.0, show_default=True, help="Gaussian sigma of the network fields, px"),
        click.option("--tile", default=512, show_default=True, help="xy tile of the network, px"),
        click.option("--halo", default=64, show_default=True, help="xy tile overlap, px"),
        click.option(
            "--task-tile",
            default=0,
            show_default=True,
            help="xy tile of the estimate and stitch tasks, px (0: from --memory-per-task)",
        ),
        click.option(
            "--memory-per-task",
            default=2.0,
            show_default=True,
            help="GiB a task may hold, about: sets --task-tile 0 and the prealignment's resolution on large sections",
        ),
        click.option("--coarse-downsample", default=2, show_default=True, help="prealignment resolution factor"),
        click.option("--trend-stiffness", default=1e4, show_default=True, help="prealignment trend along z"),
        click.option("--max-rotation", default=10.0, show_default=True, help="prealignment rotation search, deg"),
        click.option("--skip", default="", help="bad sections to bridge, e.g. 12,40"),
        click.option("--level", default=0, show_default=True, help="input OME-Zarr level"),
        click.option("--mask", default="", help="mask stack (TIFF/Zarr, IN's shape), non-zero = invalid pixels"),
        click.option(
            "--adapt", default=0, show_default=True, help="fine-tune the model on this stack for N steps first (0: off)"
        ),
        click.option(
            "--polish",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "on", "off"]),
            help="patch-wise translations after refine (auto: at fine z-spacing only)",
        ),
        click.option("--polish-patch", default=96, show_default=True, help="polish patch side, px"),
        click.option(
            "--voxel-size", default=None, help="z,y,x of IN in --unit (default: IN's metadata, else estimated)"
        ),
        click.option("--unit", default="nanometer", show_default=True, help="unit of --voxel-size"),
    ]
    for option in reversed(options):
        func = option(func)
    return _layout_options(func)


def _run_options(func):
    """How to run (not recorded: changing them does not change the result)."""
    options = [
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda"),
        click.option(
            "--scheduler", default="threads", show_default=True, help="threads[:N], processes:N, tcp://..., slurm"
        ),
        click.option("--quiet", is_flag=True, help="no progress bars"),
    ]
    func = _slurm_options(func)
    for option in reversed(options):
        func = option(func)
    return func


SLURM_HELP = "SLURM options (--scheduler slurm; unset: from ~/.config/dask/jobqueue.yaml)"


def _slurm_options(func):
    """The SLURM jobs of ``--scheduler slurm`` (dask-jobqueue); listed under their own heading in --help."""
    options = [
        click.option("--slurm-cores", type=int, help="CPU cores per job"),
        click.option("--slurm-memory", help="memory per job, e.g. 32GiB"),
        click.option("--slurm-processes", type=int, help="dask worker processes per job"),
        click.option("--slurm-walltime", help="time limit per job, e.g. 04:00:00"),
        click.option("--slurm-partition", help="partition (queue)"),
        click.option("--slurm-account", help="account to charge"),
        click.option("--slurm-job-extra", multiple=True, help="extra #SBATCH option, e.g. --gres=gpu:1 (repeatable)"),
        click.option("--slurm-prologue", multiple=True, help="shell line run before a worker starts (repeatable)"),
        click.option("--slurm-min-jobs", default=1, show_default=True, help="adaptive scaling: fewest jobs"),
        click.option("--slurm-max-jobs", default=8, show_default=True, help="adaptive scaling: most jobs"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _Command(click.Command):
    """A command whose --help lists the ``--slurm-*`` options in a section of their own."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {"Options": [], SLURM_HELP: []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections[SLURM_HELP if (param.name or "").startswith("slurm_") else "Options"].append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _jobqueue(opts: dict) -> dict:
    from emalign.cluster import slurm_options

    return slurm_options(**{key.removeprefix("slurm_"): value for key, value in opts.items() if key[:6] == "slurm_"})


def _params(opts: dict):
    from emalign.pipeline import AlignParams

    try:
        skip = tuple(int(z) for z in opts["skip"].split(",") if z.strip())
    except ValueError:
        raise EmalignError(f"--skip {opts['skip']!r}: expected comma-separated section numbers") from None
    return AlignParams(
        model=opts["model"],
        stride=opts["stride"],
        block=opts["block"],
        stitch_block=opts["stitch_block"],
        stitch_overlap=opts["stitch_overlap"],
        spring=opts["spring"],
        smoothing=opts["smoothing"],
        tile=opts["tile"],
        halo=opts["halo"],
        coarse_downsample=opts["coarse_downsample"],
        trend_stiffness=opts["trend_stiffness"],
        max_rotation_deg=opts["max_rotation"],
        skip=skip,
        level=opts["level"],
        adapt=opts["adapt"],
        polish=opts["polish"],
        polish_patch=opts["polish_patch"],
        mask=str(Path(opts["mask"]).resolve()) if opts["mask"] else "",
        voxel_size=_voxel_size(opts["voxel_size"]),
        unit=opts["unit"],
        ngff=opts["ngff"],
        shard=opts["shard"],
        task_tile=opts["task_tile"],
        memory_per_task=opts["memory_per_task"],
    )


def _voxel_size(text: str | None) -> tuple[float, ...]:
    """``"40,4,4"`` -> ``(40.0, 4.0, 4.0)``; empty -> ``()``."""
    if not text:
        return ()
    try:
        voxel = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EmalignError(f"--voxel-size {text!r}: expected three numbers z,y,x") from None
    if len(voxel) != 3:
        raise EmalignError(f"--voxel-size {text!r}: expected three numbers z,y,x")
    return voxel


@click.group()
@click.version_option(package_name="emalign")
def main() -> None:
    """Align serial-section EM stacks (Zarr, OME-Zarr, TIFF) into OME-Zarr."""
    reuse_freed_memory()


main.command_class = _Command


def _stack_command(func):
    """``IN OUT`` plus the plan and run options, and one-line errors: what align and every stage take."""
    for decorator in (friendly, _run_options, _plan_options, click.argument("output_path", metavar="OUT")):
        func = decorator(func)
    return click.argument("input_path", metavar="IN")(func)


@main.command()
@click.option("--overwrite", is_flag=True, help="replace an OUT made with other parameters")
@_stack_command
def align(input_path: str, output_path: str, overwrite: bool, **opts) -> None:
    """Align IN into the OME-Zarr OUT: prealign, estimate, stitch, refine, polish, render, qc (resumes a killed run)."""
    from emalign.pipeline import align as run_align

    start = time.perf_counter()
    params, jobqueue = _params(opts), _jobqueue(opts)
    ws, seconds, report = run_align(
        input_path, output_path, params, opts["scheduler"], opts["device"], overwrite, not opts["quiet"], jobqueue
    )
    total = time.perf_counter() - start
    depth, height, width = ws.plan.shape
    click.echo(report)
    stages = ", ".join(f"{name} {s:.1f}s" for name, s in seconds.items())
    click.echo(f"time: {total:.1f}s ({stages}); {depth * height * width / 1e6 / total:.2f} MPx/s")
    click.echo(f"aligned OME-Zarr: {output_path} (QC: {Path(output_path) / 'qc.csv'}, {Path(output_path) / 'qc.png'})")


def _stage_command(stage: str, help_text: str):
    @click.option("--z-range", default=None, help="START:STOP, the sections this run takes")
    @_stack_command
    def command(input_path: str, output_path: str, z_range: str | None, **opts) -> None:
        from emalign.cluster import check_scheduler, scheduler
        from emalign.device import resolve_device
        from emalign.io import open_stack
        from emalign.pipeline import Workspace, run_stage
        from emalign.pipeline.plan import parse_z_range

        params = _params(opts)
        check_scheduler(opts["scheduler"])
        resolve_device(opts["device"])
        stack = open_stack(input_path, level=params.level)
        parse_z_range(z_range, stack.shape[0])
        ws = Workspace.create(stack, output_path, params)
        if not opts["quiet"]:
            click.echo(ws.resolution.describe())
        with scheduler(opts["scheduler"], _jobqueue(opts)) as compute:
            click.echo(run_stage(stage, ws, z_range, compute, opts["device"], not opts["quiet"]))

    command.__doc__ = help_text
    return main.command(name=stage)(command)


_stage_command("prealign", "Stage 1: section statistics, pairwise rigid estimates, global rigid solve.")
_stage_command("adapt", "Stage 1b (--adapt N): fine-tune the model on this stack, unsupervised.")
_stage_command("estimate", "Stage 2: the network's field of every section against its neighbours.")
_stage_command("stitch", "Stage 3: reconcile the relative fields into one stitched field per section.")
_stage_command("refine", "Stage 4: translations of the stitched sections against slow wander along z.")
_stage_command("polish", "Stage 5: patch-wise translations of the refined sections (at fine z-spacing).")
_stage_command("render", "Stage 6: warp the sections and write the aligned pyramid.")
_stage_command("qc", "Stage 7: per-section quality table (qc.csv), plot (qc.png) and summary.")


@main.command(name="import")
@click.argument("input_path", metavar="IN")
@click.argument("output_path", metavar="OUT")
@click.option("--chunk", default=512, show_default=True, help="y/x chunk size")
@click.option("--voxel-size", default=None, help="z,y,x in units (default: from the input)")
@click.option("--unit", default=None, help="unit of the voxel size (default: from the input)")
@click.option("--overwrite", is_flag=True)
@_layout_options
@friendly
def import_command(
    input_path: str,
    output_path: str,
    chunk: int,
    voxel_size: str | None,
    unit: str | None,
    overwrite: bool,
    ngff: str,
    shard: int,
):
    """Convert a TIFF stack, TIFF folder or Zarr array into a chunked, compressed OME-Zarr."""
    from emalign.io import import_stack

    voxel = list(_voxel_size(voxel_size)) or None
    import_stack(
        input_path,
        output_path,
        (1, chunk, chunk),
        voxel_size=voxel,
        unit=unit,
        overwrite=overwrite,
        ngff=ngff,
        shard=shard,
    )
    click.echo(f"wrote {output_path}")


@main.command()
@click.argument("output_path", metavar="[OUT]", default="emalign-demo")
@click.option("--sections", default=48, show_default=True)
@click.option("--size", default=256, show_default=True, help="section size, px")
@click.option("--seed", default=0, show_default=True)
@click.option("--model", default="faemreg-small", show_default=True, help=MODEL_HELP)
@click.option("--device", default="auto", show_default=True)
@friendly
def demo(output_path: str, sections: int, size: int, seed: int, model: str, device: str) -> None:
    """Make an EM-like stack with known misalignment, align it, and report the accuracy."""
    from emalign.demo import run_demo

    click.echo(run_demo(output_path, sections, size, seed, model, device))


@main.command()
@click.option("--out", "out_dir", required=True, help="folder for checkpoints (last.pt, best.pt)")
@click.option("--data", multiple=True, help="aligned stack(s) to train on (TIFF/Zarr); repeatable")
@click.option("--val-data", multiple=True, help="aligned stack(s) for validation (default: procedural)")
@click.option("--model", default="faemreg-small", show_default=True, help="architecture, or a .pt to fine-tune")
@click.option("--procedural", default=2, show_default=True, help="procedural EM-like volumes to add")
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch", default=6, show_default=True)
@click.option("--crop", default=144, show_default=True, help="training crop, px")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--z-steps", default="1,2,3,4,5,6", show_default=True, help="section spacings to sample")
@click.option("--supervised-weight", default=1.0, show_default=True, help="weight of the exact synthetic target")
@click.option("--similarity-weight", default=0.0, show_default=True, help="weight of the local-NCC loss")
@click.option("--smooth-weight", default=0.05, show_default=True)
@click.option("--teacher", default="", help="a trained model (name or .pt) to distil from (fields and features)")
@click.option("--distill-weight", default=1.0, show_default=True, help="weight of the distillation loss")
@click.option("--val-every", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-resume", is_flag=True, help="start over even if OUT has a checkpoint")
@friendly
def train(out_dir: str, no_resume: bool, z_steps: str, **opts) -> None:
    """Train a serial network without labels (synthetic misalignment of aligned stacks)."""
    from emalign.train import TrainConfig
    from emalign.train import train as run_train

    steps = tuple(int(s) for s in z_steps.split(","))
    cfg = TrainConfig(
        model=opts["model"],
        data=tuple(opts["data"]),
        val_data=tuple(opts["val_data"]),
        procedural=opts["procedural"],
        z_steps=steps,
        steps=opts["steps"],
        batch=opts["batch"],
        crop=opts["crop"],
        lr=opts["lr"],
        supervised_weight=opts["supervised_weight"],
        similarity_weight=opts["similarity_weight"],
        smooth_weight=opts["smooth_weight"],
        teacher=opts["teacher"],
        distill_weight=opts["distill_weight"],
        val_every=opts["val_every"],
        seed=opts["seed"],
        device=opts["device"],
    )
    history = run_train(cfg, out_dir, resume=not no_resume)
    click.echo(
        f"validation end-point error: {history['val_epe'][0]:.3f} -> {history['val_epe'][-1]:.3f} px "
        f"(no correction: {history['val_epe_identity'][-1]:.3f} px); best checkpoint: {Path(out_dir) / 'best.pt'}"
    )


@main.command()
@click.argument("path", metavar="PATH")
@friendly
def view(path: str) -> None:
    """Open an aligned OUT in napari: aligned | raw | fields side by side, and a linked xz reslice window."""
    try:
        from emalign.napari.view import main as open_napari
    except ImportError as err:
        raise EmalignError(f"{path}: viewing needs {err.name} (not installed): pip install 'emalign[napari]'") from None
    open_napari(path)


main.add_command(volume)


if __name__ == "__main__":
    main()
