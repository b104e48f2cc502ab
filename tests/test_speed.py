"""Device-side augmentation (tlkit.data.gpu) on CPU tensors, and the speed benchmark (benchmarks/speed.py) at a
tiny size."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tlkit.data import gpu
from tlkit.paths import REPO_DIR

# The benchmark harness lives in benchmarks/ (not in the installed package); its core is tested here.
sys.path.insert(0, str(REPO_DIR / "benchmarks"))
from speed import (  # noqa: E402
    RESULT_KEYS,
    BenchConfig,
    format_table,
    results_path,
    run_benchmark,
    train_flops_per_image,
    write_result,
)


def test_rrc_boxes_bounds_ranges_and_seeding():
    g = torch.Generator().manual_seed(0)
    boxes = gpu.rrc_boxes(2000, 100, 200, scale=(0.1, 1.0), ratio=(3 / 4, 4 / 3), generator=g)
    assert boxes.shape == (2000, 4) and boxes.dtype == torch.float32
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 100).all() and (w >= 1).all() and (h >= 1).all()
    area = w * h / (100 * 200)
    assert area.min() > 0.09 and area.max() <= 1.0
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    same = gpu.rrc_boxes(2000, 100, 200, scale=(0.1, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, same)
    # another seed, other boxes (not the global RNG: earlier tests may have seeded it with 0 too)
    other = gpu.rrc_boxes(2000, 100, 200, scale=(0.1, 1.0), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(boxes, other)
    # no draw fits a 10 x 1000 strip at scale ~1: torchvision's fallback, the central crop at ratio 4/3
    strip = gpu.rrc_boxes(3, 10, 1000, scale=(0.99, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(strip, torch.tensor([[493.0, 0.0, 506.0, 10.0]] * 3))
    # per-image sizes
    mixed = gpu.rrc_boxes(2, torch.tensor([50, 300]), torch.tensor([80, 120]), generator=g)
    assert (mixed[:, 2] <= torch.tensor([80, 120])).all() and (mixed[:, 3] <= torch.tensor([50, 300])).all()


@pytest.mark.parametrize("method", ["roi_align", "grid_sample"])
def test_crop_resize_identity_flip_and_dtypes(method):
    x = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 30.0, 20.0]] * 3)
    out = gpu.crop_resize(x, whole, (20, 30), method=method)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 20, 30)
    assert (out - x.float()).abs().max() < 1e-2
    flip = torch.tensor([True, False, True])
    flipped = gpu.crop_resize(x, whole, (20, 30), flip=flip, method=method, out_dtype=torch.uint8)
    assert flipped.dtype == torch.uint8
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    sub = gpu.crop_resize(x, torch.tensor([[5.0, 3.0, 15.0, 13.0]] * 3), 10, method=method)
    assert (sub - x[:, :, 3:13, 5:15].float()).abs().max() < 1e-2
    small = gpu.crop_resize(x.float() / 255, whole, 8, method=method)  # float input keeps its scale
    assert small.shape == (3, 3, 8, 8) and float(small.min()) >= 0 and float(small.max()) <= 1


def test_roi_align_shrinking_is_antialiased():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = gpu.crop_resize(x, torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), 16)
    assert torch.allclose(out, F.avg_pool2d(x.float(), 2), atol=1e-3)


def test_augment_batch_train_eval_and_seeded():
    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    a = gpu.augment_batch(x, 24, train=True, generator=gpu.batch_generator(0, 1, 5), scale=(0.2, 1))
    b = gpu.augment_batch(x, 24, train=True, generator=gpu.batch_generator(0, 1, 5), scale=(0.2, 1))
    c = gpu.augment_batch(x, 24, train=True, generator=gpu.batch_generator(0, 1, 6), scale=(0.2, 1))
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    ev = gpu.augment_batch(x, 35, train=False, crop_pct=0.875)  # central 35 px square, no resampling
    assert torch.allclose(ev, x[:, :, 2:37, 2:37].float(), atol=1e-3)


def test_device_loader_on_cpu():
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    loader = gpu.DeviceLoader(images, np.arange(10) % 3, batch_size=4, train=True, size=8, seed=0)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    x, y, failed = batches[0]
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64 and failed.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        gpu.DeviceLoader(images[..., :1], np.arange(10), batch_size=4, train=True, size=8)


def _jpeg(color, size=(24, 16)) -> torch.Tensor:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_decode_jpeg_batch_on_cpu_with_fallbacks():
    good = [_jpeg((200, 30, 30)), _jpeg((10, 200, 10), (16, 40))]
    images, failed = gpu.decode_jpeg_batch(good, "cpu")
    assert [tuple(im.shape) for im in images] == [(3, 16, 24), (3, 40, 16)] and failed.tolist() == [0, 0]
    assert abs(int(images[0][0].float().mean()) - 200) < 4
    png = io.BytesIO()
    Image.new("L", (8, 8), 128).save(png, format="PNG")  # a PNG named .JPEG: decoded on the host
    broken = torch.frombuffer(bytearray(b"\xff\xd8broken"), dtype=torch.uint8)
    images, failed = gpu.decode_jpeg_batch(
        [good[0], torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8), broken], "cpu"
    )
    assert failed.tolist() == [0, 0, 1] and images[1].shape == (3, 8, 8) and images[2].shape == images[1].shape
    out = gpu.crop_resize_list(images, gpu.center_boxes(3, torch.tensor([16, 8, 8]), torch.tensor([24, 8, 8])), 8)
    assert out.shape == (3, 3, 8, 8)


def test_flops_convention():
    assert train_flops_per_image("resnet50", 224) == pytest.approx(3 * 2 * 4.1e9)
    assert train_flops_per_image("resnet50", 112) == pytest.approx(3 * 2 * 4.1e9 / 4)


def test_speed_benchmark_tiny(tmp_path):
    cfg = BenchConfig(
        arch="resnet18",
        img_size=32,
        batch_size=2,
        steps=2,
        warmup=1,
        num_classes=10,
        variants=("plain_fp32", "bare_nchw", "tlkit"),
        matmul_n=128,
        device="cpu",
    )
    images = np.random.default_rng(0).integers(0, 256, (8, 40, 40, 3), dtype=np.uint8)
    loader = gpu.DeviceLoader(images, np.arange(8) % 10, batch_size=2, train=True, size=32)
    result = run_benchmark(cfg, {"e2e_gpu_resident": {"loader": loader, "description": "resident, CPU smoke"}})
    for key in RESULT_KEYS:
        assert key in result
    assert result["resnet50_224_train_img_s"] is None  # filled only at the real size
    assert result["bf16_matmul_tflops"] > 0 and result["train_img_s"] > 0 and result["end_to_end_img_s"] > 0
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"plain_fp32", "bare_nchw", "tlkit"} and all(r["error"] is None for r in rows.values())
    assert all(r["img_s"] > 0 and r["mfu"] > 0 for r in rows.values())
    table = format_table(result)
    assert "| tlkit |" in table and "| e2e_gpu_resident |" in table
    path = write_result(result, results_path(result, tmp_path))
    assert path.name.endswith("-cpu.json") and json.loads(path.read_text())["torch"] == torch.__version__
    assert path.with_suffix(".md").read_text().startswith(result["device"])
