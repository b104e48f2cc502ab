"""Building a memory bank of normal patches: a uniform sample of a stream of patch rows (reservoir), then a
greedy k-center coreset of it, both cheap enough for a CPU.

Reference: Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (PatchCore), CVPR 2022.
"""

from __future__ import annotations

import math

import torch


def random_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    # Gaussian Johnson-Lindenstrauss projection: pairwise distances are preserved up to small distortion.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=gen) / math.sqrt(out_dim)


def greedy_coreset(features: torch.Tensor, n_select: int, proj_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `n_select` rows chosen by greedy k-center (farthest point) selection.

    The coreset covers the feature space evenly, so rare normal patterns survive subsampling, unlike
    with random sampling. Distances are computed in a random projection (PatchCore's approximate
    sampler) to keep each of the `n_select` passes cheap on CPU.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n)
    feats = features.float()
    if proj_dim is not None and proj_dim < feats.shape[1]:
        feats = feats @ random_projection(feats.shape[1], proj_dim, seed).to(feats.device)
    feats = feats.contiguous()
    sq = (feats**2).sum(dim=1)
    gen = torch.Generator().manual_seed(seed)
    selected = torch.empty(n_select, dtype=torch.long)
    idx = int(torch.randint(n, (1,), generator=gen))
    min_dist = torch.full((n,), float("inf"), device=feats.device)
    # Thousands of tiny ops: on CPU, thread start/stop per op costs more than it saves (and stalls badly
    # on a busy machine), so the loop runs single-threaded.
    threads = torch.get_num_threads()
    if feats.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i in range(n_select):
            selected[i] = idx
            # ||x - c||^2 as one fused matrix-vector product: the loop is memory-bound, so a small
            # projected matrix that stays in cache is what makes it fast.
            dist = torch.addmv(sq, feats, feats[idx], alpha=-2.0).add_(sq[idx])
            torch.minimum(min_dist, dist, out=min_dist)
            idx = int(torch.argmax(min_dist))
    finally:
        torch.set_num_threads(threads)
    return selected


class Reservoir:
    """Uniform random sample of at most `capacity` rows from a stream of row batches (Algorithm R)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.buf: torch.Tensor | None = None
        self.filled = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty(self.capacity, rows.shape[1], dtype=rows.dtype)
        take = min(self.capacity - self.filled, rows.shape[0])
        if take:
            self.buf[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            self.seen += take
            rows = rows[take:]
        if rows.shape[0] == 0:
            return
        # Row number t (0-based in the stream) replaces a random slot with probability capacity / (t + 1).
        t = torch.arange(self.seen, self.seen + rows.shape[0])
        slot = (torch.rand(rows.shape[0], generator=self.gen) * (t + 1).double()).long()
        keep = slot < self.capacity
        self.buf[slot[keep]] = rows[keep]
        self.seen += rows.shape[0]

    def rows(self) -> torch.Tensor:
        if self.buf is None:
            raise ValueError("no frames were given to fit")
        return self.buf[: self.filled]
