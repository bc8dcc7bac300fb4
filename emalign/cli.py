"""The ``emalign`` command: one click command per stage, plus align, demo, import and train.

Every stage takes the same ``IN OUT`` and options as ``align`` (the first to run creates
OUT, later ones check that the parameters agree) and ``--z-range START:STOP``, so a cluster
workflow can fan the stages out. Bad input ends with a one-line ``error: ...`` and exit 2.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import click

from emalign import stores
from emalign.cli_errors import friendly
from emalign.cli_options import config_from_options, field_options, field_value
from emalign.cli_volume import volume
from emalign.device import reuse_freed_memory
from emalign.errors import EmalignError
from emalign.options import DEFAULT_MODEL, option_fields
from emalign.pipeline.plan import AlignParams
from emalign.pipeline.stages import TABLE
from emalign.train_config import TrainConfig

FIELDS = option_fields(AlignParams)
TRAIN_FIELDS = option_fields(TrainConfig)
MODEL_HELP = FIELDS["model"].metadata["help"]


def _layout_options(func):
    """The output layout: NGFF version and shard size (align, every stage, import)."""
    return field_options(func, (spec for spec in FIELDS.values() if spec.metadata.get("layout")))


def _plan_options(func):
    """The options that define an alignment (recorded in the output)."""
    return _layout_options(field_options(func, (spec for spec in FIELDS.values() if not spec.metadata.get("layout"))))


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


def _params(opts: dict) -> AlignParams:
    """The :class:`emalign.pipeline.AlignParams` of the options (as :func:`~emalign.cli_options.field_options` made
    them)."""
    return config_from_options(AlignParams, opts)


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
    qc = ", ".join(stores.join(output_path, name) for name in ("qc.csv", "qc.png"))
    click.echo(f"aligned OME-Zarr: {output_path} (QC: {qc})")


def _stage_command(stage: str, help_text: str):
    @click.option("--z-range", default=None, help="START:STOP, the sections this run takes")
    @_stack_command
    def command(input_path: str, output_path: str, z_range: str | None, **opts) -> None:
        from emalign.cluster import check_scheduler, scheduler
        from emalign.device import resolve_device
        from emalign.io import open_stack
        from emalign.pipeline import Workspace, run_stage, start_report
        from emalign.pipeline.plan import parse_z_range

        params = _params(opts)
        check_scheduler(opts["scheduler"])
        resolve_device(opts["device"])
        stack = open_stack(input_path, level=params.level)
        parse_z_range(z_range, stack.shape[0])
        ws = Workspace.create(stack, output_path, params)
        if not opts["quiet"]:
            click.echo(start_report(stack, ws))
        with scheduler(opts["scheduler"], _jobqueue(opts)) as compute:
            click.echo(run_stage(stage, ws, z_range, compute, opts["device"], not opts["quiet"]))

    command.__doc__ = help_text
    return main.command(name=stage)(command)


for _stage in TABLE:
    _stage_command(_stage.name, _stage.summary)


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

    voxel = list(field_value(AlignParams, FIELDS["voxel_size"], voxel_size)) or None
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
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--device", default="auto", show_default=True)
@friendly
def demo(output_path: str, sections: int, size: int, seed: int, model: str, device: str) -> None:
    """Make an EM-like stack with known misalignment, align it, and report the accuracy."""
    from emalign.demo import run_demo

    click.echo(run_demo(output_path, sections, size, seed, model, device))


def _train_options(func):
    """The options of ``emalign train``: the :class:`emalign.train_config.TrainConfig` fields that are options."""
    return field_options(func, TRAIN_FIELDS.values())


@main.command()
@click.option("--out", "out_dir", required=True, help="folder for checkpoints (last.pt, best.pt)")
@_train_options
@click.option("--no-resume", is_flag=True, help="start over even if OUT has a checkpoint")
@friendly
def train(out_dir: str, no_resume: bool, **opts) -> None:
    """Train a serial network without labels (synthetic misalignment of aligned stacks)."""
    from emalign.train import train as run_train

    cfg = config_from_options(TrainConfig, opts)
    history = run_train(cfg, out_dir, resume=not no_resume)
    click.echo(
        f"validation end-point error: {history['val_epe'][0]:.3f} -> {history['val_epe'][-1]:.3f} px "
        f"(no correction: {history['val_epe_identity'][-1]:.3f} px); best checkpoint: {Path(out_dir) / 'best.pt'}"
    )


@main.command()
@click.argument("path", metavar="OUT")
@click.option(
    "--neuroglancer",
    is_flag=True,
    help="serve OUT (and the raw input) over HTTP with CORS and print a Neuroglancer link, instead of napari",
)
@click.option("--input", "raw", default=None, help="--neuroglancer: the raw OME-Zarr too (default: OUT's input if one)")
@click.option("--host", default="127.0.0.1", show_default=True, help="--neuroglancer: address to serve on")
@click.option("--port", default=0, show_default=True, help="--neuroglancer: port to serve on (0: a free one)")
@friendly
def view(path: str, neuroglancer: bool, raw: str | None, host: str, port: int) -> None:
    """Open an aligned OUT in napari: aligned | raw | fields side by side, and a linked xz reslice window; or
    (--neuroglancer) serve it to Neuroglancer in the browser until Ctrl+C."""
    if neuroglancer:
        from emalign.neuroglancer import start

        server, url, state = start(path, raw, host, port)
        if len(state["layers"]) == 1:
            click.echo("raw input not shown: OUT's input is not an OME-Zarr (`emalign import` it, pass --input)")
        click.echo(f"serving on http://{server.server_address[0]}:{server.server_address[1]}/ until Ctrl+C; open:")
        click.echo(url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
        return
    if raw is not None:
        raise EmalignError(f"{path}: --input goes with --neuroglancer (napari shows the recorded input)")
    try:
        from emalign.napari.view import main as open_napari
    except ImportError as err:
        raise EmalignError(f"{path}: viewing needs {err.name} (not installed): pip install 'emalign[napari]'") from None
    open_napari(path)


main.add_command(volume)


if __name__ == "__main__":
    main()
