"""Batch augmentation in torch, on any device, and loaders that keep per-image host work out of training.

Everything here works on CPU tensors too (that is how it is tested); on CUDA the same calls run as a
handful of kernels per batch instead of thousands of per-image Python calls in DataLoader workers.

- `rrc_boxes` draws torchvision-style RandomResizedCrop boxes for a whole batch (vectorised, from a seeded
  CPU generator, so results do not depend on the device); `crop_resize` cuts and resizes those boxes
  with `torchvision.ops.roi_align` (adaptive sampling: several samples per output pixel when shrinking,
  a box filter against aliasing) or with `grid_sample` (pure torch), and mirrors the images picked for
  horizontal flip. Outputs are float32 in 0..255 (or uint8), NCHW: exactly what the engine's
  `StepContext.prepare` expects before `normalize`.
- `DeviceLoader`: the whole dataset as one uint8 tensor on the device (small sets: tiny_imagenet at 64 px
  is 0.25 GB); each batch is an index gather plus `crop_resize`, with no host work at all.
- `decode_jpeg_batch` / `JpegLoader`: files read on host threads, decoded in one batched
  `torchvision.io.decode_jpeg(device="cuda")` call (nvJPEG), augmented on the GPU; no preparation step.

Only torch and torchvision are needed (no albumentations, no gradio); torchvision is imported lazily.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_RATIO = (3 / 4, 4 / 3)


# ---- random resized crop ------------------------------------------------------------------------------


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A CPU generator for one batch: augmentation is a function of (seed, epoch, batch number) only,
    so a resumed run replays it and the device (CPU or CUDA) does not change it."""
    state = int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def rrc_boxes(
    n: int,
    heights: int | torch.Tensor,
    widths: int | torch.Tensor,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes, (n, 4) float32 `x1, y1, x2, y2` in pixel-edge coordinates, on the CPU.

    torchvision's algorithm, vectorised: up to `attempts` draws of (area fraction, log aspect ratio) per
    image, the first that fits wins; images where none fits get the central crop clamped to `ratio`."""
    h = torch.as_tensor(heights, dtype=torch.float64).expand(n)
    w = torch.as_tensor(widths, dtype=torch.float64).expand(n)
    area = (h * w)[:, None]
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w[:, None]) & (ch <= h[:, None])
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    cw, ch = cw.gather(1, pick)[:, 0], ch.gather(1, pick)[:, 0]
    y = torch.floor(u[..., 2].gather(1, pick)[:, 0] * (h - ch + 1))
    x = torch.floor(u[..., 3].gather(1, pick)[:, 0] * (w - cw + 1))
    # fallback: torchvision's central crop
    in_ratio = w / h
    fw = torch.where(in_ratio < ratio[0], w, torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w))
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    fh = torch.where(in_ratio > ratio[1], h, fh)
    fy, fx = torch.floor((h - fh) / 2), torch.floor((w - fw) / 2)
    miss = first < 0
    x, y = torch.where(miss, fx, x), torch.where(miss, fy, y)
    cw, ch = torch.where(miss, fw, cw), torch.where(miss, fh, ch)
    return torch.stack([x, y, x + cw, y + ch], dim=1).float()


def center_boxes(n: int, heights: int | torch.Tensor, widths: int | torch.Tensor, crop_pct: float = 1.0):
    """Evaluation crop as a box: resizing the short side to `size / crop_pct` and center-cropping `size`
    takes the central square of side `crop_pct * short side` from the source image."""
    h = torch.as_tensor(heights, dtype=torch.float32).expand(n)
    w = torch.as_tensor(widths, dtype=torch.float32).expand(n)
    side = torch.minimum(h, w) * min(1.0, crop_pct)
    side = torch.where((side - side.round()).abs() < 1e-3, side.round(), side)
    y, x = torch.floor((h - side) / 2), torch.floor((w - side) / 2)  # whole pixels, as CenterCrop does
    return torch.stack([x, y, x + side, y + side], dim=1)


def flip_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < p


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | Sequence[int],
    *,
    flip: torch.Tensor | None = None,
    method: str = "roi_align",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cut `boxes` (N,4 `x1,y1,x2,y2`, pixel edges) out of `images` (N,C,H,W uint8 or float, any device)
    and resize each to `size`; images with `flip` set are mirrored. float32 0..255 out (or uint8).

    `roi_align` samples ceil(box/out) points per output pixel and averages them, so shrinking a large
    box is anti-aliased; `grid_sample` takes one bilinear sample per pixel (pure torch, flips for free).
    A box equal to the whole image at the image's own size returns the pixels unchanged with both."""
    oh, ow = _size2(size)
    n = images.shape[0]
    x = images if images.is_floating_point() else images.float()
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    if method == "roi_align":
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(n, device=x.device, dtype=torch.float32)[:, None], boxes], dim=1)
        out = roi_align(x, rois, output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if flip is not None and bool(flip.any()):
            flip = flip.to(x.device)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    elif method == "grid_sample":
        h, w = x.shape[-2:]
        sx = (boxes[:, 2] - boxes[:, 0]) / w
        sy = (boxes[:, 3] - boxes[:, 1]) / h
        cx = (boxes[:, 0] + boxes[:, 2]) / w - 1
        cy = (boxes[:, 1] + boxes[:, 3]) / h - 1
        if flip is not None:
            sx = torch.where(flip.to(x.device), -sx, sx)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
        grid = F.affine_grid(theta, [n, x.shape[1], oh, ow], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        raise ValueError(f"unknown crop method {method!r}; use roi_align or grid_sample")
    out = out.clamp_(0, 255)  # interpolation arithmetic can overshoot by an ulp
    return out.round_().to(torch.uint8) if out_dtype == torch.uint8 else out.to(out_dtype)


def augment_batch(
    images: torch.Tensor,
    size: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    hflip: float = 0.5,
    crop_pct: float = 1.0,
    method: str = "roi_align",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training: random resized crop + flip; evaluation: center crop (`crop_pct`) + resize. NCHW in/out."""
    n, _, h, w = images.shape
    if train:
        boxes = rrc_boxes(n, h, w, scale=scale, ratio=ratio, generator=generator)
        flip = flip_mask(n, hflip, generator)
    else:
        boxes, flip = center_boxes(n, h, w, crop_pct), None
    return crop_resize(images, boxes, size, flip=flip, method=method, out_dtype=out_dtype)


def nhwc_to_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (how packs and decoders store pixels) -> NCHW view; no copy."""
    return images.permute(0, 3, 1, 2)


# ---- batching shared by the loaders ------------------------------------------------------------------------


class _Range:
    """What EpochSampler needs of a dataset: its length."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def epoch_sampler(n: int, *, train: bool, seed: int, rank: int, world: int, weights=None):
    """The same sampler the engine's DataLoader uses (order from (seed, epoch), DDP shards, `start`)."""
    from tlkit.data.loader import EpochSampler

    return EpochSampler(
        _Range(n), num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train, weights=weights
    )


class _BatchLoader:
    """Common shape of the fast loaders: `len()`, `.sampler` (set_epoch / start, as the engine uses),
    `set_epoch`, `set_size` (progressive resizing) and iteration yielding `(images, targets, failed)`."""

    def __init__(self, n, *, batch_size, train, size, seed, rank, world, weights=None):
        self.batch_size, self.train, self.size, self.seed = batch_size, train, size, seed
        self.sampler = epoch_sampler(n, train=train, seed=seed, rank=rank, world=world, weights=weights)
        self.drop_last = train and n >= batch_size * world
        self._failed = torch.zeros(batch_size, dtype=torch.int64)
        self.known_failed = 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_size(self, size: int) -> None:
        self.size = int(size)

    def _batches(self) -> Iterator[tuple[int, list[int]]]:
        """(global batch number, indices); the number counts from the epoch start, also after a resume."""
        indices = list(self.sampler)
        first = self.sampler.start // self.batch_size
        stop = len(self) * self.batch_size
        for b, i in enumerate(range(0, stop, self.batch_size)):
            yield first + b, indices[i : i + self.batch_size]

    def _generator(self, batch: int) -> torch.Generator:
        return batch_generator(self.seed, self.sampler.epoch, batch)

    def failed_zeros(self, n: int, batch: int = -1) -> torch.Tensor:
        """The batch's unreadable-image counts: none are read here, but files a pack could not decode are
        counted once an epoch, in its first batch (`known_failed`, set on rank 0), as the DataLoader counts them."""
        if batch == 0 and self.known_failed:
            out = torch.zeros(n, dtype=torch.int64)
            out[0] = self.known_failed
            return out
        return self._failed[:n] if n <= len(self._failed) else torch.zeros(n, dtype=torch.int64)


class DeviceLoader(_BatchLoader):
    """The whole dataset resident on `device` as uint8 NHWC; batches are gathered and augmented there.

    For small datasets (rule of thumb: the uint8 pixels take under a quarter of free GPU memory), this
    removes the host from the loop entirely: no decode, no copies, no workers."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        *,
        batch_size: int,
        train: bool,
        size: int,
        device: torch.device | str = "cpu",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        hflip: float = 0.5,
        crop_pct: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        weights=None,
        method: str = "roi_align",
    ):
        super().__init__(
            len(labels),
            batch_size=batch_size,
            train=train,
            size=size,
            seed=seed,
            rank=rank,
            world=world,
            weights=weights,
        )
        self.device = torch.device(device)
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images)
            images = torch.from_numpy(images if images.flags.writeable else images.copy())
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"DeviceLoader wants uint8 N x H x W x 3 images, got {tuple(images.shape)} {images.dtype}")
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        self.aug = dict(scale=scale, ratio=ratio, hflip=hflip, crop_pct=crop_pct, method=method)

    def __iter__(self):
        for b, idx in self._batches():
            index = torch.as_tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)
            batch = nhwc_to_nchw(self.images.index_select(0, index))
            out = augment_batch(batch, self.size, train=self.train, generator=self._generator(b), **self.aug)
            yield out, self.labels.index_select(0, index), self.failed_zeros(len(idx), b)


# ---- GPU JPEG decoding --------------------------------------------------------------------------------------


def _decode_one_on_host(data: bytes) -> torch.Tensor:
    from tlkit.data.io import load_rgb_array

    return torch.from_numpy(load_rgb_array(data)).permute(2, 0, 1).contiguous()


def decode_jpeg_batch(
    datas: Sequence[torch.Tensor], device: torch.device | str = "cuda"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decode encoded images (1-d uint8 tensors) to 3xHxW uint8 RGB on `device`; returns (images, failed).

    One batched nvJPEG call on CUDA; where the batch call fails (a PNG named .JPEG, CMYK, a broken file),
    each image is retried alone, then on the host with PIL (`tlkit.data.io`), which reads what nvJPEG
    cannot. A file nothing can decode is replaced by the previous good image and flagged in `failed`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to torchcodec
        try:
            images = list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
            return images, torch.zeros(len(images), dtype=torch.int64)
        except RuntimeError:
            pass
        images: list[torch.Tensor | None] = []
        for data in datas:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                continue
            except RuntimeError:
                pass
            try:
                images.append(_decode_one_on_host(data.numpy().tobytes()).to(device))
            except ValueError:
                images.append(None)
    failed = torch.tensor([im is None for im in images], dtype=torch.int64)
    good = next((im for im in images if im is not None), None)
    if good is None:
        raise ValueError("no image of the batch could be decoded")
    last = good
    for i, im in enumerate(images):
        if im is None:
            images[i] = last
        else:
            last = im
    return images, failed  # type: ignore[return-value]


def crop_resize_list(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    size: int,
    *,
    flip: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`crop_resize` for images of different sizes (3xHxW each): one roi_align per image, into one batch."""
    from torchvision.ops import roi_align

    oh, ow = _size2(size)
    out = torch.empty(len(images), 3, oh, ow, device=images[0].device, dtype=torch.float32)
    boxes = boxes.to(images[0].device, torch.float32)
    zero = torch.zeros(len(images), 1, device=boxes.device)
    rois = torch.cat([zero, boxes], dim=1)
    for i, im in enumerate(images):
        out[i : i + 1] = roi_align(im[None].float(), rois[i : i + 1], (oh, ow), 1.0, -1, True)
    if flip is not None and bool(flip.any()):
        flip = flip.to(out.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8) if out_dtype == torch.uint8 else out


class JpegLoader(_BatchLoader):
    """Files -> host threads read the bytes -> one batched nvJPEG decode on the GPU -> GPU crop/flip.

    For data with no pack (nothing to prepare, any image size); the host only reads files. `samples` are
    (path, target) pairs, e.g. from `tlkit.data.datasets.scan_split`. Works on CPU too (slowly)."""

    def __init__(
        self,
        samples: Sequence,
        *,
        batch_size: int,
        train: bool,
        size: int,
        device: torch.device | str = "cuda",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        hflip: float = 0.5,
        crop_pct: float = 0.875,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        weights=None,
        threads: int = 8,
        prefetch: int = 3,
    ):
        super().__init__(
            len(samples),
            batch_size=batch_size,
            train=train,
            size=size,
            seed=seed,
            rank=rank,
            world=world,
            weights=weights,
        )
        self.paths = [Path(getattr(s, "path", s[0] if isinstance(s, tuple) else s)) for s in samples]
        self.targets = torch.tensor([int(getattr(s, "target", s[1] if isinstance(s, tuple) else 0)) for s in samples])
        self.device = torch.device(device)
        self.aug = dict(scale=scale, ratio=ratio, hflip=hflip, crop_pct=crop_pct)
        self.threads, self.prefetch = threads, prefetch

    def _read(self, idx: list[int]) -> list[torch.Tensor]:
        return [torch.frombuffer(bytearray(self.paths[i].read_bytes()), dtype=torch.uint8) for i in idx]

    def __iter__(self):
        batches = list(self._batches())
        with ThreadPoolExecutor(self.threads) as pool:
            pending = [pool.submit(self._read, idx) for _, idx in batches[: self.prefetch]]
            for k, (b, idx) in enumerate(batches):
                datas = pending[k].result()
                if k + self.prefetch < len(batches):
                    pending.append(pool.submit(self._read, batches[k + self.prefetch][1]))
                images, failed = decode_jpeg_batch(datas, self.device)
                hw = torch.tensor([im.shape[-2:] for im in images], dtype=torch.float32)
                g = self._generator(b)
                if self.train:
                    boxes = rrc_boxes(
                        len(images), hw[:, 0], hw[:, 1], scale=self.aug["scale"], ratio=self.aug["ratio"], generator=g
                    )
                    flip = flip_mask(len(images), self.aug["hflip"], g)
                else:
                    boxes, flip = center_boxes(len(images), hw[:, 0], hw[:, 1], self.aug["crop_pct"]), None
                out = crop_resize_list(images, boxes, self.size, flip=flip)
                yield out, self.targets[idx].to(self.device, non_blocking=True), failed


def self_check(device: torch.device | str = "cuda") -> dict:
    """Device results against CPU results for the same inputs (run first in a GPU session): crop_resize
    both methods, and decode_jpeg on the device vs on the host. Max abs differences, in 0..255 units."""
    import io

    from PIL import Image

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 96, 128), generator=g, dtype=torch.uint8)
    boxes = rrc_boxes(8, 96, 128, scale=(0.08, 1.0), generator=g)
    flip = flip_mask(8, 0.5, g)
    out = {}
    for method in ("roi_align", "grid_sample"):
        cpu = crop_resize(x, boxes, 64, flip=flip, method=method)
        dev = crop_resize(x.to(device), boxes, 64, flip=flip, method=method).cpu()
        out[f"crop_resize_{method}_max_abs_diff"] = float((cpu - dev).abs().max())
    arr = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    host, _ = decode_jpeg_batch([data, data], "cpu")
    dev_images, failed = decode_jpeg_batch([data, data], device)
    out["decode_jpeg_max_abs_diff"] = float((host[0].float() - dev_images[0].cpu().float()).abs().max())
    out["decode_jpeg_failed"] = int(failed.sum())
    out["device"] = str(device)
    return out
