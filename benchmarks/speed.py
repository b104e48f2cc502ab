"""Training-speed benchmark core: tlkit's own training step beside baselines, in one process.

`tlkit` rows run the engine's real code: model, optimizer, schedule, loss and step context from
`tlkit.run.build_run` (what `engine.fit` builds), and the step itself is `tlkit.engine.train_one_epoch`
(`train_step`: StepContext.prepare -> normalize -> autocast_for -> loss -> backward -> optimizer step,
then the scheduler step) over a synthetic uint8 batch already on the device, as a device-side loader
would hand it over. Baselines are written the way their projects write them:

- `plain_fp32`: torchvision model, fp32, NCHW, plain SGD; PyTorch's default precision flags;
- `tv_amp`: torchvision's classification reference with `--amp` (fp16 autocast + GradScaler on CUDA), NCHW;
- `timm_amp_cl`: timm's train.py with `--amp --amp-dtype bfloat16 --channels-last` (timm model, timm's
  SGD from `create_optimizer_v2`); `timm_amp_cl_compile` adds `torch.compile`.

Each row: img/s over `steps` timed steps after `warmup` steps (CUDA synchronised around the timed
window), MFU = achieved training FLOP/s over the bf16 matmul rate measured in the same process, and peak
memory (CUDA only: `torch.cuda.max_memory_allocated`).

FLOPs: ResNet-50 @224 is 4.1 G multiply-accumulates forward (the "4.1 GFLOPs" of the papers), i.e.
8.2 GFLOP counting multiplies and adds apart, which is how the matmul probe counts (2 n^3); training is
3x the forward; other sizes scale by (size/224)^2. Archs without a table entry are counted with
`torch.utils.flop_counter`.

Needs torch, torchvision and timm only: no albumentations, no gradio.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Forward multiply-accumulates at 224 px, in G (torchvision / timm model cards).
FWD_GMACS_224 = {"resnet18": 1.82, "resnet34": 3.67, "resnet50": 4.1, "resnet101": 7.8, "resnet152": 11.5}

RESULT_KEYS = (
    "device",
    "torch",
    "resnet50_224_train_img_s",
    "resnet50_224_end_to_end_img_s",
    "baseline_tv_amp_img_s",
    "baseline_timm_amp_cl_img_s",
    "bf16_matmul_tflops",
)

SYNTHETIC_VARIANTS = ("plain_fp32", "tv_amp", "timm_amp_cl", "tlkit", "timm_amp_cl_compile", "tlkit_compile")

DESCRIPTIONS = {
    "plain_fp32": "plain loop: torchvision model, fp32, NCHW, SGD, PyTorch default flags",
    "tv_amp": "torchvision reference --amp: fp16 autocast + GradScaler (bf16 on CPU), NCHW",
    "timm_amp_cl": "timm train.py --amp bf16 --channels-last, timm SGD",
    "timm_amp_cl_compile": "timm_amp_cl + torch.compile",
    "bare_nchw": "bare loop, same model as tlkit (timm), NCHW, plain SGD, input pre-normalised",
    "bare_cl": "bare loop, same model as tlkit (timm), channels_last",
    "tlkit": "tlkit engine: train_one_epoch, recipe defaults (amp auto, channels_last)",
    "tlkit_nchw": "tlkit engine with model.channels_last=false",
    "tlkit_compile": "tlkit engine + model.compile (the imagenet recipe's gpu block)",
}


@dataclass
class BenchConfig:
    arch: str = "resnet50"
    img_size: int = 224
    batch_size: int = 256
    steps: int = 30
    warmup: int = 10
    num_classes: int = 1000
    device: str = "auto"
    variants: tuple[str, ...] = SYNTHETIC_VARIANTS
    repeats: int = 1  # >1: run the whole variant list again, interleaved; rows report the median
    matmul_n: int = 0  # 0: 8192 on CUDA, 1024 on CPU
    threads: int = 0  # CPU: torch.set_num_threads (0 = leave)


@dataclass
class Row:
    name: str
    img_s: float | None
    step_ms: float | None
    mfu: float | None
    peak_mem_gib: float | None
    precision: str
    layout: str
    compiled: bool
    description: str = ""
    samples: list[float] = field(default_factory=list)
    error: str | None = None


# ---- probes ---------------------------------------------------------------------------------------------


def resolve(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cpus} CPUs)"


def device_slug(device: torch.device) -> str:
    """`h200` for 'NVIDIA H200', `cpu` for any CPU: the <device> part of results file names."""
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower().replace("nvidia", "").replace("geforce", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or "cuda"


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 0, iters: int = 0) -> float:
    """Measured dense matmul rate (TFLOP/s, 2 n^3 per product) on random data: the MFU denominator."""
    device = resolve(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    iters = iters or (20 if device.type == "cuda" else 3)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        c = a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    sync(device)
    seconds = time.perf_counter() - t0
    del a, b, c
    return 2 * n**3 * iters / seconds / 1e12


def train_flops_per_image(arch: str, size: int) -> float:
    """Training FLOPs per image: 3 x forward, forward = 2 x MACs, scaled by (size/224)^2."""
    if arch in FWD_GMACS_224:
        return 3 * 2 * FWD_GMACS_224[arch] * 1e9 * (size / 224) ** 2
    from torch.utils.flop_counter import FlopCounterMode

    from tlkit.models import create_model

    model = create_model(arch, 1000).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return 3 * counter.get_total_flops()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextlib.contextmanager
def precision_flags(*, benchmark: bool = True, matmul_tf32: bool = False, cudnn_tf32: bool = True):
    """Set cudnn.benchmark / TF32 for one variant and put the previous values back (PyTorch defaults:
    matmul TF32 off, cuDNN TF32 on)."""
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved


# ---- the synthetic batch and the timed loop -----------------------------------------------------------------


def synthetic_batch(cfg: BenchConfig, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 targets on `device` (what a device-side loader hands the engine)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)
    return images.to(device), targets.to(device)


class RepeatLoader:
    """`n` batches, each the same tensors: a loader-shaped iterable for `train_one_epoch`."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, n: int):
        self.images, self.targets, self.n = images, targets, n
        self.failed = torch.zeros(images.shape[0], dtype=torch.int64)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.targets, self.failed


class TakeLoader:
    """The first `n` batches of a real loader, re-iterated per epoch (end-to-end timing)."""

    def __init__(self, loader: Iterable, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader)) if hasattr(self.loader, "__len__") else self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step` after `warmup` calls, device synchronised at both ends."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


# ---- tlkit: the engine's own step -----------------------------------------------------------------------------


class _NoFiles:
    """The train split of a synthetic run: no files, only what `build_run` asks of one (labels for a
    weighted loss, which the benchmark recipe does not use)."""

    def targets(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        pass


def engine_setup(cfg: BenchConfig, device: torch.device, loader, *, channels_last: bool = True, compile: bool = False):
    """The `Run` that `engine.fit` would build (`run.build_run`: model, optimizer, schedule, loss, step context)
    for the benchmark's arch, size, batch and device, fed by `loader` (synthetic or real batches)."""
    from tlkit.config import DataConfig, ModelConfig, Recipe, TrainConfig
    from tlkit.data.loader import DataBundle
    from tlkit.run import RunData, build_run

    recipe = Recipe(
        data=DataConfig(img_size=cfg.img_size),
        model=ModelConfig(arch=cfg.arch, channels_last=channels_last, compile=compile),
        train=TrainConfig(epochs=2, batch_size=cfg.batch_size, device=str(device)),
    )
    classes = [str(c) for c in range(cfg.num_classes)]
    bundle = DataBundle(_NoFiles(), None, classes, classes, "")  # type: ignore[arg-type]
    return build_run(recipe, data=RunData(bundle, loader, None))


def time_engine(cfg: BenchConfig, device: torch.device, loader, warm_loader, **setup) -> float:
    """Seconds for one `train_one_epoch` over `loader`, after one over `warm_loader`."""
    from tlkit.engine import train_one_epoch

    run = engine_setup(cfg, device, loader, **setup)

    def epoch(data, number):
        train_one_epoch(
            run.compiled, data, run.optimizer, run.scheduler, run.criterion, run.ctx, epoch=number, recipe=run.recipe
        )

    epoch(warm_loader, 1)
    sync(device)
    t0 = time.perf_counter()
    epoch(loader, 2)
    sync(device)
    return time.perf_counter() - t0


def _engine_precision(device: torch.device):
    """What `run.resolve_device` sets on CUDA (cudnn.benchmark and TF32 on)."""
    if device.type == "cuda":
        return precision_flags(benchmark=True, matmul_tf32=True, cudnn_tf32=True)
    return contextlib.nullcontext()


def run_tlkit(cfg: BenchConfig, device: torch.device, *, channels_last=True, compile=False) -> float:
    images, targets = synthetic_batch(cfg, device)
    with _engine_precision(device):
        return time_engine(
            cfg,
            device,
            RepeatLoader(images, targets, cfg.steps),
            RepeatLoader(images, targets, cfg.warmup),
            channels_last=channels_last,
            compile=compile,
        )


# ---- baselines ------------------------------------------------------------------------------------------------


def _torchvision_model(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    if hasattr(torchvision.models, arch):
        return getattr(torchvision.models, arch)(num_classes=num_classes)
    from tlkit.models import create_model

    return create_model(arch, num_classes)


def _normalized(images: torch.Tensor) -> torch.Tensor:
    """What a torchvision/timm loader delivers: float, normalised (here done once, outside the timing)."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def run_plain_fp32(cfg: BenchConfig, device: torch.device) -> float:
    images, targets = synthetic_batch(cfg, device)
    x = _normalized(images)
    model = _torchvision_model(cfg.arch, cfg.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), targets)
        loss.backward()
        optimizer.step()

    with precision_flags(benchmark=True, matmul_tf32=False, cudnn_tf32=True):
        return time_steps(step, cfg.warmup, cfg.steps, device)


def tv_amp_step(model, criterion, optimizer, scaler, images, targets, *, dtype, enabled: bool = True) -> None:
    """One step as torchvision's classification reference writes it with `--amp` (autocast + GradScaler)."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=enabled):
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def run_tv_amp(cfg: BenchConfig, device: torch.device) -> float:
    images, targets = synthetic_batch(cfg, device)
    x = _normalized(images)
    model = _torchvision_model(cfg.arch, cfg.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if cuda else None

    def step():
        tv_amp_step(model, criterion, optimizer, scaler, x, targets, dtype=dtype)

    with precision_flags(benchmark=True):
        return time_steps(step, cfg.warmup, cfg.steps, device)


def run_timm_amp_cl(cfg: BenchConfig, device: torch.device, *, compile: bool = False) -> float:
    import timm
    from timm.optim import create_optimizer_v2

    images, targets = synthetic_batch(cfg, device)
    x = _normalized(images)
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes).to(device)
    model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    train_model = torch.compile(model) if compile else model

    def step():
        inp = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = criterion(train_model(inp), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with precision_flags(benchmark=True):
        return time_steps(step, cfg.warmup, cfg.steps, device)


def run_bare(cfg: BenchConfig, device: torch.device, *, channels_last: bool = False) -> float:
    """The same model as the engine's (`tlkit.models.create_model`) in a bare loop: plain SGD, plain CE,
    pre-normalised input, autocast as the engine's amp=auto would. Engine overhead = this vs `tlkit*`."""
    from tlkit.models import create_model
    from tlkit.run import autocast_for

    images, targets = synthetic_batch(cfg, device)
    x = _normalized(images)
    model = create_model(cfg.arch, cfg.num_classes).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step():
        with autocast_for(device, "auto"):
            loss = criterion(model(x).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with _engine_precision(device):
        return time_steps(step, cfg.warmup, cfg.steps, device)


def _variant(name: str, cfg: BenchConfig, device: torch.device) -> tuple[Callable[[], float], str, str, bool]:
    """(run, precision, layout, compiled) for a variant name."""
    amp = "bf16" if device.type == "cuda" else "fp32"  # the engine's amp=auto
    table = {
        "plain_fp32": (lambda: run_plain_fp32(cfg, device), "fp32", "NCHW", False),
        "tv_amp": (lambda: run_tv_amp(cfg, device), "fp16" if device.type == "cuda" else "bf16", "NCHW", False),
        "timm_amp_cl": (lambda: run_timm_amp_cl(cfg, device), "bf16", "NHWC", False),
        "timm_amp_cl_compile": (lambda: run_timm_amp_cl(cfg, device, compile=True), "bf16", "NHWC", True),
        "bare_nchw": (lambda: run_bare(cfg, device), amp, "NCHW", False),
        "bare_cl": (lambda: run_bare(cfg, device, channels_last=True), amp, "NHWC", False),
        "tlkit": (lambda: run_tlkit(cfg, device), amp, "NHWC", False),
        "tlkit_nchw": (lambda: run_tlkit(cfg, device, channels_last=False), amp, "NCHW", False),
        "tlkit_compile": (lambda: run_tlkit(cfg, device, compile=True), amp, "NHWC", device.type == "cuda"),
    }
    if name not in table:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(table)}")
    return table[name]


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def bench_synthetic(cfg: BenchConfig, device: torch.device, bf16_tflops: float | None) -> list[Row]:
    """Every variant of `cfg.variants`, `cfg.repeats` times interleaved; a failing variant gives an error row."""
    flops = train_flops_per_image(cfg.arch, cfg.img_size)
    images = cfg.batch_size * cfg.steps
    samples: dict[str, list[float]] = {n: [] for n in cfg.variants}
    peaks: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for _ in range(max(1, cfg.repeats)):
        for name in cfg.variants:
            if name in errors:
                continue
            run = _variant(name, cfg, device)[0]
            reset_peak(device)
            try:
                seconds = run()
            except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                continue
            samples[name].append(images / seconds)
            peak = peak_memory_gib(device)
            peaks[name] = max(peak, peaks.get(name) or 0.0) if peak is not None else None
    rows = []
    for name in cfg.variants:
        _, precision, layout, compiled = _variant(name, cfg, device)
        if name in errors or not samples[name]:
            rows.append(
                Row(
                    name,
                    None,
                    None,
                    None,
                    None,
                    precision,
                    layout,
                    compiled,
                    DESCRIPTIONS.get(name, ""),
                    error=errors.get(name),
                )
            )
            continue
        img_s = _median(samples[name])
        mfu = img_s * flops / (bf16_tflops * 1e12) if bf16_tflops else None
        rows.append(
            Row(
                name,
                img_s,
                1000 * cfg.batch_size / img_s,
                mfu,
                peaks.get(name),
                precision,
                layout,
                compiled,
                DESCRIPTIONS.get(name, ""),
                samples=[round(s, 2) for s in samples[name]],
            )
        )
    reset_peak(device)
    return rows


def bench_end_to_end(
    cfg: BenchConfig,
    device: torch.device,
    name: str,
    loader,
    bf16_tflops: float | None,
    *,
    compile: bool = False,
    description: str = "",
    num_classes: int = 0,
) -> Row:
    """The engine's `train_one_epoch` fed by a real loader (its first `steps` batches, after `warmup`)."""
    flops = train_flops_per_image(cfg.arch, cfg.img_size)
    if num_classes:
        cfg = replace(cfg, num_classes=num_classes)
    reset_peak(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    try:
        with _engine_precision(device):
            seconds = time_engine(
                cfg, device, TakeLoader(loader, cfg.steps), TakeLoader(loader, cfg.warmup), compile=compile
            )
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return Row(name, None, None, None, None, precision, "NHWC", compile, description, error=err)
    n = min(cfg.steps, len(loader)) * cfg.batch_size
    img_s = n / seconds
    mfu = img_s * flops / (bf16_tflops * 1e12) if bf16_tflops else None
    return Row(
        name,
        img_s,
        1000 * cfg.batch_size / img_s,
        mfu,
        peak_memory_gib(device),
        precision,
        "NHWC",
        compile and device.type == "cuda",
        description,
    )


# ---- the result --------------------------------------------------------------------------------------------


def _best(rows: list[Row], prefix: str) -> float | None:
    values = [r.img_s for r in rows if r.img_s is not None and r.name.startswith(prefix)]
    return max(values) if values else None


def _row(rows: list[Row], name: str) -> float | None:
    return next((r.img_s for r in rows if r.name == name and r.img_s is not None), None)


def run_benchmark(cfg: BenchConfig, end_to_end: dict[str, tuple] | None = None) -> dict:
    """Matmul probe, synthetic rows and end-to-end rows -> the results dict (`RESULT_KEYS` and more).

    `end_to_end` maps a row name to a dict of `bench_end_to_end` arguments: `loader` and optionally
    `description`, `compile`, `num_classes` (the loader's class count, when not `cfg.num_classes`).
    The `resnet50_224_*` keys are filled only for resnet50 at 224 px (null otherwise; `train_img_s`
    and `end_to_end_img_s` always hold this run's tlkit numbers)."""
    import torchvision

    device = resolve(cfg.device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    bf16 = matmul_tflops(device, torch.bfloat16, n=cfg.matmul_n)
    fp32 = matmul_tflops(device, torch.float32, n=cfg.matmul_n)
    rows = bench_synthetic(cfg, device, bf16) if cfg.variants else []
    e2e_rows = []
    for name, spec in (end_to_end or {}).items():
        spec = dict(spec)
        e2e_rows.append(bench_end_to_end(cfg, device, name, spec.pop("loader"), bf16, **spec))
    train = _best(rows, "tlkit")
    e2e = _best(e2e_rows, "")
    real_size = cfg.arch == "resnet50" and cfg.img_size == 224
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    try:
        from tlkit.paths import git_sha

        sha = git_sha()
    except Exception:  # noqa: BLE001
        sha = None
    return {
        "schema": 1,
        "date": date.today().isoformat(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm_version,
        "git_sha": sha,
        "config": {k: v for k, v in asdict(cfg).items() if k != "variants"},
        "resnet50_224_train_img_s": train if real_size else None,
        "resnet50_224_end_to_end_img_s": e2e if real_size else None,
        "baseline_tv_amp_img_s": _row(rows, "tv_amp"),
        "baseline_timm_amp_cl_img_s": _row(rows, "timm_amp_cl"),
        "baseline_timm_amp_cl_compile_img_s": _row(rows, "timm_amp_cl_compile"),
        "baseline_plain_fp32_img_s": _row(rows, "plain_fp32"),
        "train_img_s": train,
        "end_to_end_img_s": e2e,
        "end_to_end_ratio": e2e / train if e2e and train else None,
        "bf16_matmul_tflops": bf16,
        "fp32_matmul_tflops": fp32,
        "train_gflop_per_image": train_flops_per_image(cfg.arch, cfg.img_size) / 1e9,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": [asdict(r) for r in rows],
        "end_to_end": [asdict(r) for r in e2e_rows],
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """The result as markdown: a header line and one table row per variant, baselines first."""
    c = result["config"]
    head = (
        f"{result['device']}, torch {result['torch']}, {c['arch']} @{c['img_size']} px, batch {c['batch_size']}, "
        f"{c['steps']} timed steps after {c['warmup']}; bf16 matmul {result['bf16_matmul_tflops']:.3g} TFLOP/s, "
        f"fp32 {result['fp32_matmul_tflops']:.3g}; {result['train_gflop_per_image']:.3g} GFLOP/img (train)"
    )
    lines = [
        head,
        "",
        "| variant | img/s | ms/step | MFU (bf16 peak) | peak mem GiB | precision | layout | compiled | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in result["rows"] + result["end_to_end"]:
        notes = r["error"] or r["description"]
        if len(r.get("samples") or []) > 1:
            notes += f" (median of {', '.join(f'{s:.1f}' for s in r['samples'])})"
        lines.append(
            f"| {r['name']} | {_fmt(r['img_s'], '.1f')} | {_fmt(r['step_ms'], '.1f')} | "
            f"{_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'%' if r['mfu'] is not None else ''} | "
            f"{_fmt(r['peak_mem_gib'], '.2f')} | {r['precision']} | {r['layout']} | "
            f"{'yes' if r['compiled'] else 'no'} | {notes} |"
        )
    return "\n".join(lines)


def results_path(result: dict, folder: str | os.PathLike = "benchmarks/results") -> Path:
    """`<folder>/<yyyy-mm-dd>-<device>.json`."""
    dev = torch.device("cuda" if result["device_type"] == "cuda" else "cpu")
    slug = device_slug(dev) if dev.type == "cuda" and torch.cuda.is_available() else result["device_type"]
    return Path(folder) / f"{result['date']}-{slug}.json"


def write_result(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(format_table(result) + "\n")
    return path
