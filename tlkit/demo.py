"""`tlkit demo <recipe>`: run `apps/<recipe>/app.py`, plus what the Gradio apps share.

The apps import this module for: finding a checkpoint, loading a model lazily and once, reading
uploads defensively (size limits, undecodable files -> a one-line message), example files from the
dataset the checkpoint was trained on, and launching with a queue, an upload limit and no telemetry.
Gradio is imported only inside functions, so `import tlkit.demo` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from tlkit.paths import APPS_DIR, data_root, set_offline_env

MAX_FILE_SIZE = "25mb"  # per upload; Gradio rejects larger files before any of our code runs
MAX_UPLOAD_PIXELS = 50_000_000  # ~7000x7000: larger images get a message instead of a 150 MB decode
T = TypeVar("T")


class UploadError(ValueError):
    """An upload the demo cannot use; the message is shown to the user as is."""


# ---- checkpoints --------------------------------------------------------------------------------------


def available_apps() -> list[str]:
    """Recipes with a demo: each app folder, and each recipe whose `base:` has one (malaria: medical's app)."""
    from tlkit.config import available_recipes, recipe_base

    apps = {p.parent.name for p in APPS_DIR.glob("*/app.py")}
    return sorted(apps | {name for name in available_recipes() if recipe_base(name) in apps})


def resolve_checkpoint(recipe: str, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint given (a run folder means its best.pt), else the best.pt of the newest run whose
    checkpoint records this recipe; neither -> ValueError."""
    from tlkit.checkpoint import newest_run
    from tlkit.checkpoint import resolve_checkpoint as resolve_file

    if checkpoint:
        return resolve_file(checkpoint)
    newest = newest_run(recipe=recipe, kind="finetune")
    if newest is None:
        raise ValueError(
            f"no {recipe} checkpoint found in runs/: make one with `tlkit finetune --recipe {recipe}`, "
            "or pass --checkpoint <best.pt>"
        )
    return newest


def checkpoint_meta(path: str | Path) -> dict:
    """A checkpoint's metadata without reading its weights (memory-mapped load, tensors dropped)."""
    from tlkit.checkpoint import read_meta

    return read_meta(path)


class Lazy(Generic[T]):
    """A value built on first use, once, even when several requests arrive together."""

    def __init__(self, build: Callable[[], T]):
        self._build, self._value, self._lock = build, None, threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
        return self._value

    def get_for_request(self) -> T:
        """`get()` inside a Gradio handler: a missing or unusable checkpoint becomes a `gr.Error`."""
        import gradio as gr

        try:
            return self.get()
        except ValueError as e:  # CheckpointError, no checkpoint yet, wrong task
            raise gr.Error(str(e), title="No model") from None


def lazy_checkpoint(recipe: str, checkpoint: str | Path | None, load: Callable[[Path], T]) -> Lazy[T]:
    """`load(resolved checkpoint path)` on first use (checkpoint None: the recipe's newest run)."""
    return Lazy(lambda: load(resolve_checkpoint(recipe, checkpoint)))


def model_service(recipe: str, checkpoint: str | Path | None, *, preload: bool) -> tuple[Lazy, dict | None]:
    """What an app serves: the model its recipe's task loads from `checkpoint` (None: the recipe's newest run,
    found on first use), loaded now when `preload` and a checkpoint is given; and the checkpoint's metadata."""
    from tlkit.config import load_recipe
    from tlkit.tasks import task_of

    task = task_of(load_recipe(recipe))
    service = lazy_checkpoint(recipe, checkpoint, lambda path: task.load_predictor(path, device="auto"))
    meta = checkpoint_meta(checkpoint) if checkpoint else None
    if checkpoint and preload:
        service.get()
    return service, meta


# ---- uploads ------------------------------------------------------------------------------------------


def read_upload(path: str | Path | None, max_pixels: int = MAX_UPLOAD_PIXELS):
    """An uploaded image file -> HxWx3 uint8 RGB array, or `UploadError` with a message for the user.

    The header is read first, so a 20000x20000 image is refused before anything is decoded."""
    import numpy as np
    from PIL import Image

    from tlkit.data.io import ImageDecodeError, describe_error, load_rgb_array

    if path is None or str(path) == "":
        raise UploadError("no image: upload one (or click an example) first")
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise UploadError(f"{name}: image too large (more than {max_pixels / 1e6:.0f} megapixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(_named(name, describe_error(e, path))) from None
    if width * height > max_pixels:
        raise UploadError(
            f"{name}: image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
            f"this demo accepts up to {max_pixels / 1e6:.0f})"
        )
    try:
        return np.ascontiguousarray(load_rgb_array(path))
    except (ImageDecodeError, OSError) as e:
        raise UploadError(_named(name, describe_error(e, path))) from None


def upload_or_error(path: str | Path | None, max_pixels: int = MAX_UPLOAD_PIXELS):
    """`read_upload` inside a Gradio handler: an unusable upload becomes a message in the UI."""
    import gradio as gr

    try:
        return read_upload(path, max_pixels)
    except UploadError as e:
        raise gr.Error(str(e), title="Cannot use this image") from None


def _named(name: str, message: str) -> str:
    return message if message.startswith(name) else f"{name}: {message}"


def upload_image(**kwargs):
    """A `gr.Image` that hands the uploaded file's path to the handler untouched.

    Plain `gr.Image` opens the file with PIL while preprocessing, so a non-image upload fails inside
    Gradio with a generic error; this one lets `read_upload` say what is wrong with the file. (The
    instance's `preprocess` is replaced rather than subclassing: Gradio writes a `.pyi` stub next to
    any module that defines a component class.)"""
    import gradio as gr

    kwargs.setdefault("type", "filepath")
    component = gr.Image(**kwargs)
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    component.preprocess = preprocess
    return component


def image_file(rgb, name: str = "image") -> str:
    """An HxWx3 uint8 array -> a PNG in Gradio's cache folder, at a path named after its content
    (`<cache>/<sha256>/<name>.png`), written to a temp file and renamed into place; for image outputs.

    Handing Gradio the array instead makes it write the same content-named path in place (truncate, then
    write): when two requests produce the same image (the same upload twice, or an update that repeats an
    image), one request's write truncated the file while another's download was streaming it, and that
    client failed with `RemoteProtocolError: peer closed connection`. A rename never alters a file being read."""
    import hashlib
    import io
    import os
    import tempfile

    from gradio.utils import get_upload_folder
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(get_upload_folder()) / hashlib.sha256(data).hexdigest()
    path = folder / f"{name}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return str(path)


def example_files(
    root: str | Path | None,
    fallback: str,
    split: str = "val",
    per_class: int = 1,
    limit: int = 8,
    class_ids: list[str] | None = None,
) -> list[str]:
    """Up to `limit` example images from `<root>/<split>/<class>/`, from classes spread evenly over the
    class list (restricted to `class_ids`, the classes the model knows), `per_class` from each; `root` is
    the dataset the checkpoint was trained on, else `data_root()/<fallback>`."""
    from tlkit.data.io import is_image_file

    candidates = [Path(root)] if root else []
    candidates.append(data_root() / fallback)
    for base in candidates:
        folder = base / split
        if not folder.is_dir():
            continue
        classes = sorted(d for d in folder.iterdir() if d.is_dir() and (class_ids is None or d.name in class_ids))
        n_classes = max(1, min(len(classes), limit // max(1, per_class)))
        if len(classes) > n_classes:
            step = len(classes) / n_classes
            classes = [classes[int(i * step)] for i in range(n_classes)]
        per = [sorted(f for f in d.iterdir() if f.is_file() and is_image_file(f))[:per_class] for d in classes]
        picked = [files[i] for i in range(per_class) for files in per if i < len(files)]
        if picked:
            return [str(p) for p in picked[:limit]]
    return []


# ---- launching ----------------------------------------------------------------------------------------


def theme():
    """Gradio's default look with system fonts: nothing is fetched from font CDNs (offline machines)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def serve(
    demo,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    concurrency: int = 2,
    max_file_size: str | int = MAX_FILE_SIZE,
    css: str | None = None,
    prevent_thread_lock: bool = False,
):
    """Queue (at most `concurrency` requests of an event at once; others wait) and launch."""
    set_offline_env()
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        show_error=True,
        theme=theme(),
        css=css,
        footer_links=["api"],
        run_history=False,  # uploads (e.g. radiographs) are not kept in the browser's history
        prevent_thread_lock=prevent_thread_lock,
    )


def app_main(recipe: str, build_demo: Callable[..., Any], *, concurrency: int = 2, css: str | None = None, argv=None):
    """`python apps/<recipe>/app.py --checkpoint ... --host ... --port ...`"""
    parser = argparse.ArgumentParser(description=f"tlkit {recipe} demo (Gradio)")
    parser.add_argument("--checkpoint", default=None, help=f"default: newest runs/finetune-{recipe}-*/best.pt")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve on the network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="public Gradio link (off by default)")
    args = parser.parse_args(argv)
    try:  # building the app reads the checkpoint: an unsafe, foreign or edited file is one line too
        demo = build_demo(resolve_checkpoint(recipe, args.checkpoint))
    except ValueError as e:  # CheckpointError, DataError, no checkpoint yet
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(demo, host=args.host, port=args.port, share=args.share, concurrency=concurrency, css=css)


def app_path(recipe: str) -> Path:
    """`apps/<recipe>/app.py`; a recipe without an app of its own uses its `base:` recipe's (malaria -> medical)."""
    from tlkit.config import RecipeError, recipe_base

    name, seen = recipe, set()
    while name and name not in seen:
        path = APPS_DIR / name / "app.py"
        if path.is_file():
            return path
        seen.add(name)
        try:
            name = recipe_base(name)
        except RecipeError:  # not a recipe either
            break
    raise ValueError(f"no demo for {recipe!r}; available: {', '.join(available_apps()) or 'none'}")


def load_app(recipe: str) -> ModuleType:
    """Import `apps/<recipe>/app.py` by file path (the apps are not a package)."""
    path = app_path(recipe)
    set_offline_env()
    name = f"tlkit_app_{path.parent.name.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def launch_demo(
    recipe: str,
    checkpoint: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    *,
    prevent_thread_lock: bool = False,
):
    """`tlkit demo <recipe>`: load the checkpoint (default: the recipe's newest fine-tuning run) into
    `apps/<recipe>/app.py` and serve it. `share=True` (a public link) only when asked."""
    set_offline_env()  # before gradio is imported anywhere
    app_path(recipe)
    path = resolve_checkpoint(recipe, checkpoint)
    module = load_app(recipe)
    demo = module.build_demo(path)
    return serve(
        demo,
        host=host,
        port=port,
        share=share,
        concurrency=getattr(module, "CONCURRENCY", 2),
        css=getattr(module, "CSS", None),
        prevent_thread_lock=prevent_thread_lock,
    )
