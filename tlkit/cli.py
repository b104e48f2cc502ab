"""`tlkit` command line: parses options and delegates; the work lives in the library modules."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from tlkit.paths import set_offline_env

set_offline_env()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tlkit: ImageNet pretraining, fine-tuning recipes and demos for image recognition.",
)

# Options shared by every training command.
Data = Annotated[str | None, typer.Option("--data", help="Dataset folder, or a name under $TLKIT_DATA.")]
Arch = Annotated[str | None, typer.Option("--arch", help="Any timm model name, e.g. resnet50.")]
Epochs = Annotated[int | None, typer.Option("--epochs", min=1)]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Per process.")]
ImgSize = Annotated[int | None, typer.Option("--img-size", min=16)]
Lr = Annotated[float | None, typer.Option("--lr", help="Base LR for a batch of 256 (scaled linearly).")]
Out = Annotated[str | None, typer.Option("--out", help="Run folder (default runs/<kind>-<arch>-<time>).")]
Resume = Annotated[str | None, typer.Option("--resume", help="Run folder or last.pt to continue exactly.")]
Seed = Annotated[int | None, typer.Option("--seed")]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
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
    from tlkit.checkpoint import CheckpointError
    from tlkit.config import RecipeError
    from tlkit.data.datasets import DataError

    try:
        return fn(*args, **kwargs)
    except (DataError, RecipeError, CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    except ValueError as e:
        if str(e) and "\n" not in str(e).strip():
            _fail(str(e))
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
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe name or YAML path.")] = "imagenet",
) -> None:
    """Pretrain a model on ImageNet-layout data (default: the tiny_imagenet_200 sample)."""
    options = dict(locals())  # every option above, by name
    _train("pretrain", options.pop("recipe"), options.pop("resume"), options.pop("quiet"), options)


@app.command()
def finetune(
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help="medical, traffic-signs, surveillance or a YAML path (not with --resume)."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Pretrained weights: a tlkit checkpoint, a timm/"
            "torchvision weights file, or 'scratch'. Default: newest `tlkit pretrain` run.",
        ),
    ] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", help="linear-probe, full or freeze-unfreeze.")] = None,
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
    topk: Annotated[int, typer.Option("--topk", min=1)] = 5,
    device: Device = "auto",
) -> None:
    """Classify images: one JSON line per image with top-k labels and probabilities."""
    from tlkit.predict import predict_files

    for line in _run_guarded(predict_files, checkpoint, images, topk=topk, device=device):
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
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default beside the checkpoint).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Max abs logit difference allowed.")] = 1e-3,
) -> None:
    """Export to ONNX or TorchScript with a metadata JSON, and check parity against torch."""
    from tlkit.export import export_checkpoint

    _setup_logging()
    _run_guarded(export_checkpoint, checkpoint, format=format, out=out, tolerance=tolerance)


@app.command("lr-find")
def lr_find(
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe name or YAML path.")] = "imagenet",
    init: Annotated[str | None, typer.Option("--init", help="Weights to start from (see finetune).")] = None,
    data: Data = None,
    arch: Arch = None,
    batch_size: BatchSize = None,
    img_size: ImgSize = None,
    device: Device = None,
    sets: Sets = None,
    steps: Annotated[int, typer.Option("--steps", min=10)] = 100,
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
    recipe: Annotated[str, typer.Argument(help="medical, traffic-signs or surveillance.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Default: newest run of the recipe.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Public Gradio link (off by default).")] = False,
) -> None:
    """Launch the recipe's Gradio demo (apps/<recipe>/app.py)."""
    from tlkit.demo import launch_demo

    _run_guarded(launch_demo, recipe, checkpoint=checkpoint, host=host, port=port, share=share)


@app.command("recipes")
def list_recipes() -> None:
    """List the recipes in recipes/ with one line each."""
    import yaml

    from tlkit.config import available_recipes

    recipes = sorted(available_recipes().items())
    width = max((len(name) for name, _ in recipes), default=0)
    for name, path in recipes:
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        typer.echo(f"{name:{width}s}  {description}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
