"""`tlkit` command line: parses options and delegates; the work lives in the library modules."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperGroup

from tlkit.paths import set_offline_env

set_offline_env()

from tlkit.config import DEVICE_HELP, DEVICE_PATTERN, STRATEGIES, available_recipes  # noqa: E402
from tlkit.demo import available_apps  # noqa: E402

# click's UsageError (typer vendors click in newer releases, so it is reached through typer's own subclass)
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineErrors(TyperGroup):
    """A usage error (unknown option, a value outside its choices or range, a missing option) is one `error:`
    line and exit 2, like every other bad input; a bare `tlkit` still prints the help."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        return _one_line(super().make_context, *args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        return _one_line(super().invoke, ctx)


def _one_line(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            raise
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        _fail(e.format_message().replace("Value error, ", "").rstrip(".") + where)  # typer's prefix says nothing


app = typer.Typer(
    cls=_OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tlkit: ImageNet pretraining, fine-tuning recipes and demos for image recognition.",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tlkit {version('tlkit')}")
        except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
            from tlkit import __version__

            typer.echo(f"tlkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# Options shared by every training command.
Data = Annotated[str | None, typer.Option("--data", help="Dataset folder, or a name under $TLKIT_DATA.")]
Arch = Annotated[str | None, typer.Option("--arch", help="Any timm model name, e.g. resnet50.")]
Epochs = Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs (train.epochs).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Per process.")]
ImgSize = Annotated[int | None, typer.Option("--img-size", min=16, help="Train/eval image size in px (data.img_size).")]
Lr = Annotated[float | None, typer.Option("--lr", help="Base LR for a batch of 256 (scaled linearly).")]
Out = Annotated[str | None, typer.Option("--out", help="Run folder (default runs/<kind>-<arch>-<time>).")]
Resume = Annotated[str | None, typer.Option("--resume", help="Run folder or last.pt to continue exactly.")]
Seed = Annotated[int | None, typer.Option("--seed", min=0, help="Random seed: data order, augmentation, init.")]


def _check_device(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"{value!r} is not one of {DEVICE_HELP}")
    return value


Device = Annotated[
    str | None,
    typer.Option("--device", callback=_check_device, metavar="[auto|cpu|cuda|cuda:N]", help="Where to run."),
]
RECIPE_HELP = f"Recipe: {', '.join(available_recipes())}, or a path to a recipe YAML file."


def _complete_recipes(incomplete: str) -> list[str]:
    return [name for name in available_recipes() if name.startswith(incomplete)]


Sets = Annotated[list[str] | None, typer.Option("--set", help="Any recipe field: --set optim.lr=0.1 (repeatable).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _overrides(**cli) -> dict:
    """CLI options -> nested recipe overrides; `--set` entries win over named options."""
    from tlkit.config import deep_merge, parse_set

    mapping = {
        "data": ("data", "name"),
        "arch": ("model", "arch"),
        "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"),
        "img_size": ("data", "img_size"),
        "lr": ("optim", "lr"),
        "out": ("train", "out"),
        "seed": ("train", "seed"),
        "device": ("train", "device"),
        "init": ("model", "init"),
        "strategy": ("finetune", "strategy"),
    }
    out: dict = {}
    for key, value in cli.items():
        if key in mapping and value is not None:
            section, field = mapping[key]
            out.setdefault(section, {})[field] = value
    return deep_merge(out, parse_set(cli.get("sets") or []))


def _run_guarded(fn, *args, **kwargs):
    """Known user errors (bad data, recipe, checkpoint) become one red line, not a traceback."""
    from tlkit.checkpoint import CheckpointError, is_disk_full
    from tlkit.config import RecipeError
    from tlkit.data.datasets import DataError

    try:
        return fn(*args, **kwargs)
    except (DataError, RecipeError, CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    except ValueError as e:  # incl. DiskFullError and a diverged run (engine.DivergedError)
        if str(e) and "\n" not in str(e).strip():
            _fail(str(e))
        raise
    except (OSError, RuntimeError) as e:  # a disk-full write not already named by the run folder's writers
        if is_disk_full(e):
            where = Path(e.filename).parent if isinstance(e, OSError) and e.filename else "the output folder"
            _fail(f"disk full: no space left in {where} (files already there are intact); free some space")
        raise


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)


@app.command()
def pretrain(
    data: Data = None,
    arch: Arch = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    img_size: ImgSize = None,
    lr: Lr = None,
    out: Out = None,
    resume: Resume = None,
    seed: Seed = None,
    device: Device = None,
    sets: Sets = None,
    quiet: Quiet = False,
    recipe: Annotated[str, typer.Option("--recipe", help=RECIPE_HELP, autocompletion=_complete_recipes)] = "imagenet",
    init: Annotated[
        str | None, typer.Option("--init", help="Start from weights instead of scratch (same forms as finetune).")
    ] = None,
) -> None:
    """Pretrain a model on ImageNet-layout data (default: the tiny_imagenet_200 sample)."""
    options = dict(locals())  # every option above, by name
    _train("pretrain", options.pop("recipe"), options.pop("resume"), options.pop("quiet"), options)


@app.command()
def finetune(
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help=RECIPE_HELP + " Not needed with --resume.", autocompletion=_complete_recipes),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Pretrained weights: timm:<model>[.<tag>], hf-hub:<org>/<repo>, torchvision:<Weights> (published; "
            "hub cache first), a tlkit checkpoint, a timm/torchvision weights file, or 'scratch'. Default: newest "
            "`tlkit pretrain` run.",
        ),
    ] = None,
    strategy: Annotated[
        Literal[STRATEGIES] | None,  # type: ignore[valid-type]
        typer.Option("--strategy", help="Transfer strategy (finetune.strategy)."),
    ] = None,
    data: Data = None,
    arch: Arch = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    img_size: ImgSize = None,
    lr: Lr = None,
    out: Out = None,
    resume: Resume = None,
    seed: Seed = None,
    device: Device = None,
    sets: Sets = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune pretrained weights with a recipe; writes checkpoints and a report/ folder."""
    options = dict(locals())
    if recipe is None and resume is None:
        _fail("finetune needs --recipe (or --resume <run> to continue one); `tlkit recipes` lists them")
    _train("finetune", options.pop("recipe"), options.pop("resume"), options.pop("quiet"), options)


def _train(kind: str, recipe: str | None, resume: str | None, quiet: bool, options: dict) -> None:
    """pretrain and finetune: options -> recipe overrides -> one training run."""
    from tlkit.workflows import run_training

    _setup_logging()
    overrides = _run_guarded(_overrides, **options)
    _run_guarded(run_training, recipe, overrides, kind=kind, resume=resume, quiet=quiet)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A tlkit checkpoint (best.pt).")],
    data: Annotated[str, typer.Option("--data", help="Dataset root, split folder, or name under $TLKIT_DATA.")],
    split: Annotated[str, typer.Option("--split", help="Split to use when --data is a dataset root.")] = "val",
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default <run>/eval-<split>).")] = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
) -> None:
    """Evaluate a checkpoint on a labelled split; prints and writes metrics.json and a report."""
    from tlkit.workflows import evaluate_checkpoint

    _setup_logging()
    metrics = _run_guarded(
        evaluate_checkpoint, checkpoint, data, split=split, out=out, batch_size=batch_size, device=device
    )
    typer.echo(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict | list)}, indent=2))


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A tlkit checkpoint.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (or folders of images).")],
    topk: Annotated[int, typer.Option("--topk", min=1, help="Labels per image, most probable first.")] = 5,
    device: Device = "auto",
    boxes: Annotated[
        Path | None,
        typer.Option(
            "--boxes",
            help="For models trained on box crops (traffic-signs): a <split>_labels.csv with each image's "
            "box (filename, roi_x1..roi_y2). Without it such images are used whole.",
        ),
    ] = None,
) -> None:
    """Classify images: one JSON line per image with top-k labels and probabilities."""
    from tlkit.predict import predict_files

    for line in _run_guarded(predict_files, checkpoint, images, topk=topk, device=device, boxes=boxes):
        typer.echo(json.dumps(line))


@app.command()
def explain(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A tlkit checkpoint.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the Grad-CAM overlays.")] = Path("explain"),
    target: Annotated[str | None, typer.Option("--target", help="Class to explain (default: predicted).")] = None,
) -> None:
    """Grad-CAM heatmaps overlaid on the images (pytorch-grad-cam)."""
    from tlkit.explain import explain_files

    for path in _run_guarded(explain_files, checkpoint, images, out=out, target=target):
        typer.echo(str(path))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A tlkit checkpoint.")],
    format: Annotated[
        Literal["onnx", "pt2"], typer.Option("--format", help="onnx (onnxruntime) or pt2 (torch.export).")
    ] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default beside the checkpoint).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Max abs logit difference allowed.")] = 1e-3,
) -> None:
    """Export to ONNX or torch.export (.pt2) with a metadata JSON, and check parity against torch."""
    from tlkit.export import export_checkpoint

    _setup_logging()
    _run_guarded(export_checkpoint, checkpoint, format=format, out=out, tolerance=tolerance)


@app.command("lr-find")
def lr_find(
    recipe: Annotated[str, typer.Option("--recipe", help=RECIPE_HELP, autocompletion=_complete_recipes)] = "imagenet",
    init: Annotated[str | None, typer.Option("--init", help="Weights to start from (see finetune).")] = None,
    data: Data = None,
    arch: Arch = None,
    batch_size: BatchSize = None,
    img_size: ImgSize = None,
    device: Device = None,
    sets: Sets = None,
    steps: Annotated[int, typer.Option("--steps", min=10, help="Optimizer steps in the sweep.")] = 100,
    out: Annotated[Path | None, typer.Option("--out", help="Plot path (default runs/lr-find-<recipe>.png).")] = None,
) -> None:
    """LR range test: loss vs learning rate plot and a suggested value."""
    from tlkit.lr_finder import run_lr_find

    _setup_logging()
    overrides = _run_guarded(
        _overrides, data=data, arch=arch, batch_size=batch_size, img_size=img_size, device=device, sets=sets, init=init
    )
    _run_guarded(run_lr_find, recipe, overrides, steps=steps, out=out)


@app.command()
def demo(
    recipe: Annotated[
        str, typer.Argument(help=f"Recipe with a demo: {', '.join(available_apps())}.", autocompletion=available_apps)
    ],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Default: newest run of the recipe.")] = None,
    host: Annotated[str, typer.Option("--host", help="Interface to serve on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Public Gradio link (off by default).")] = False,
) -> None:
    """Launch the recipe's Gradio demo (apps/<recipe>/app.py)."""
    from tlkit.demo import launch_demo

    _run_guarded(launch_demo, recipe, checkpoint=checkpoint, host=host, port=port, share=share)


data_app = typer.Typer(
    cls=_OneLineErrors, no_args_is_help=True, help="Prepare datasets: `tlkit data pack` for the GPU data path."
)
app.add_typer(data_app, name="data")


@data_app.command("pack")
def data_pack(
    data: Data = None,
    split: Annotated[Literal["train", "val", "all"], typer.Option("--split", help="Which split(s) to pack.")] = "all",
    size: Annotated[
        int | None, typer.Option("--size", min=8, help="Train pack size in px (default: the recipe's img_size).")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="Folder for the <split>-<size>/ packs (default packs/<dataset>).")
    ] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe whose data settings to pack by.")] = "imagenet",
    sets: Sets = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace packs already there.")] = False,
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes (-1: all cores).")] = -1,
    quiet: Quiet = False,
) -> None:
    """Decode a dataset once into uint8 packs (train at --size, val at size / crop_pct) for data.loader packed/gpu."""
    from tlkit.data.data_path import pack_data

    _setup_logging()
    overrides = _run_guarded(_overrides, data=data, sets=sets)
    _run_guarded(
        pack_data, recipe, overrides, split=split, size=size, out=out, overwrite=overwrite, workers=workers, quiet=quiet
    )


@app.command()
def watch(
    source: Annotated[
        str, typer.Argument(help="Video file, frame folder, camera index (0) or stream URL (rtsp://...).")
    ],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A surveillance (anomaly) checkpoint.")],
    events: Annotated[Path | None, typer.Option("--events", help="Append event JSON lines here (not stdout).")] = None,
    webhook: Annotated[str | None, typer.Option("--webhook", help="POST each event's JSON to this URL.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for each event's peak image and clip.")] = None,
    realtime: Annotated[bool, typer.Option("--realtime", help="Play a video file at its fps, like a camera.")] = False,
    max_seconds: Annotated[float | None, typer.Option("--max-seconds", min=0, help="Stop after this long.")] = None,
    device: Device = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No live status line.")] = False,
) -> None:
    """Watch a camera, stream or video with a surveillance checkpoint: one JSON line per alert event."""
    from tlkit.tasks.anomaly.watch import WatchOptions, watch_source

    _setup_logging()
    options = WatchOptions(events, webhook, out, realtime, max_seconds, quiet, device or "auto")
    _run_guarded(watch_source, checkpoint, source, options)


@app.command("recipes")
def list_recipes(
    show: Annotated[
        str | None,
        typer.Option(
            "--show",
            metavar="NAME|FILE",
            autocompletion=_complete_recipes,
            help="Print this recipe resolved: every field, defaults filled in, as a run on this machine would use it.",
        ),
    ] = None,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--cpu", help="With --show: merge the gpu: block or not (default: when CUDA is present)."),
    ] = None,
) -> None:
    """List the recipes with one line each, or print one resolved (--show)."""
    import yaml

    if show is not None:
        from tlkit.config import resolved_yaml

        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        typer.echo(_run_guarded(resolved_yaml, show, cuda=gpu), nl=False)
        return
    recipes = sorted(available_recipes().items())
    width = max((len(name) for name, _ in recipes), default=0)
    for name, path in recipes:
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        typer.echo(f"{name:{width}s}  {description}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
