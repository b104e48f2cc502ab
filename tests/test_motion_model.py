"""Tests for the anomaly scorer's motion measure (tlkit.tasks.anomaly.scorer): the optical-flow speed per patch
that new fits score motion with (`_flow_grid`), on real UCSD Ped2 frames, and the frame-difference measure
that older checkpoints keep (`_motion_grid`).

Test001 has a cyclist riding left to right from frame 61 on; frames 111-140 show him mid-view among walkers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlkit.data.clips import iter_frames, load_clips
from tlkit.paths import data_root
from tlkit.tasks.anomaly import PatchCoreScorer
from tlkit.tasks.anomaly.scorer import _flow_grid, _motion_grid

PED2 = data_root() / "ucsd_ped2"
needs_data = pytest.mark.skipif(
    not (PED2 / "train").is_dir(), reason=f"UCSD Ped2 sample data not found at {PED2} (set $TLKIT_DATA)"
)
GRID = (16, 24)  # the stride-8 grid of a 192x128 frame (the surveillance recipe's size)


def _scorer(img_size: int = 128, motion_weight: float = 1.0) -> PatchCoreScorer:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    pre = {"img_size": img_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return PatchCoreScorer(model, pre, motion_weight=motion_weight)


@pytest.fixture(scope="module")
def test001():
    return load_clips(PED2 / "val" / "Test001")[0]


@pytest.fixture(scope="module")
def resized(test001) -> torch.Tensor:
    """Test001 frames 1-30 (walkers only) then 111-140 (the cyclist among walkers), resized as scored."""
    frames = list(iter_frames(test001.frames[0:30] + test001.frames[110:140]))
    return _scorer()._resized(frames)


def _fastest(measure, frames: torch.Tensor) -> np.ndarray:
    motion, _ = measure(frames, None, GRID)
    return motion.flatten(1).max(dim=1).values.numpy()


@needs_data
def test_flow_speed_is_in_pixels_per_frame(resized) -> None:
    # A real frame moved 2 px to the right: every patch moves 2 px (a little less where the ground is flat).
    frame = resized[:1]
    motion, last = _flow_grid(torch.cat([frame, torch.roll(frame, 2, dims=-1)]), None, GRID)
    assert motion.shape == (2, *GRID, 1)
    inner = motion[1, 2:-2, 2:-2, 0].numpy()  # away from the rolled-over border
    assert 1.6 < np.median(inner) < 2.2, np.median(inner)  # measured 1.86
    assert last.shape == (1, 1, *frame.shape[-2:])  # the last grey frame, the next batch's predecessor


@needs_data
def test_still_frames_and_a_lone_frame_have_no_motion(resized) -> None:
    still, _ = _flow_grid(resized[5:6].expand(3, -1, -1, -1), None, GRID)
    assert still.abs().max() == 0
    lone, _ = _flow_grid(resized[5:6], None, GRID)
    assert lone.abs().max() == 0
    # A stream's first frame is compared with the second, so it does not start with "nothing moves".
    start, _ = _flow_grid(resized[:4], None, GRID)
    assert start[0].max() > 0.1


@needs_data
def test_flow_speed_singles_out_the_cyclist_frame_difference_does_not(resized) -> None:
    # The fastest patch of each frame (first frames of the two runs left out: no real predecessor).
    walkers = _fastest(_flow_grid, resized[:30])[1:]
    cyclist = _fastest(_flow_grid, resized[30:])[1:]
    # measured: walkers at most 0.61 px/frame, the cyclist at least 0.71
    assert walkers.max() < cyclist.min(), (walkers.max(), cyclist.min())
    # The grey-level frame difference also grows with size and contrast: walkers reach the cyclist's level.
    walkers_diff = _fastest(_motion_grid, resized[:30])[1:]
    cyclist_diff = _fastest(_motion_grid, resized[30:])[1:]
    assert walkers_diff.max() > cyclist_diff.min(), (walkers_diff.max(), cyclist_diff.min())
    # The fastest patch is the cyclist: mid-height, riding to the right.
    motion, _ = _flow_grid(resized[30:], None, GRID)
    cells = motion[1:].flatten(1).argmax(dim=1).numpy()
    rows, cols = cells // GRID[1], cells % GRID[1]
    assert ((rows >= 7) & (rows <= 10)).all(), rows
    assert cols[-5:].mean() > cols[:5].mean() + 1.5, cols


@needs_data
def test_new_fits_score_flow_old_states_keep_frame_differences(test001) -> None:
    train = load_clips(PED2 / "train" / "Train001")[0]
    scorer = _scorer(img_size=64).fit(train.frames[:20], calib_frames=train.frames[40:50], seed=0)
    assert scorer.config["motion_score"] == "flow"
    assert scorer.motion_bank is None  # only the first (bank) design needs one
    assert scorer.scales[1] > 0.01, scorer.scales  # the spread of a speed in pixels per frame, not of noise
    frames = list(iter_frames(test001.frames[100:112]))
    # Batches carry the last frame over: motion does not depend on how a stream is cut into batches.
    whole = [m for _, _, m in scorer._iter_embedded(frames, 12)][0]
    cut = torch.cat([m for _, _, m in scorer._iter_embedded(frames, 5)])
    torch.testing.assert_close(cut, whole)
    grid = tuple(whole.shape[1:3])
    torch.testing.assert_close(whole, _flow_grid(scorer._resized(frames), None, grid)[0])
    scores = scorer.score(frames)
    state = scorer.state_dict()
    np.testing.assert_array_equal(PatchCoreScorer.from_state_dict(state, scorer.model).score(frames), scores)
    # A checkpoint fitted with the frame-difference measure keeps scoring with it, as it was calibrated.
    state["config"]["motion_score"] = "speed"
    old = PatchCoreScorer.from_state_dict(state, scorer.model)
    motion = [m for _, _, m in old._iter_embedded(frames, 12)][0]
    torch.testing.assert_close(motion, _motion_grid(scorer._resized(frames), None, grid)[0])
    assert not np.allclose(old.score(frames), scores)
