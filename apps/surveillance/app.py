"""CCTV anomaly demo (UCSD Ped2 style): stream a video through the PatchCore scorer, plot the anomaly score
over time as frames are processed, list the alerts and show the most abnormal frame with its heat map.

Run: `tlkit demo surveillance [--checkpoint runs/.../best.pt]` or
`python apps/surveillance/app.py --checkpoint ... --host 127.0.0.1 --port 7860`. The checkpoint is an
anomaly checkpoint (`tlkit finetune --recipe surveillance`). Nothing heavy happens at import: the
scorer loads on the first request, or in `build_demo(checkpoint)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tlkit.paths import data_root, set_offline_env

set_offline_env()  # before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from tlkit.data.io import describe_error  # noqa: E402
from tlkit.demo import Lazy, app_main, checkpoint_meta, image_file, lazy_checkpoint  # noqa: E402

if TYPE_CHECKING:
    from tlkit.tasks.anomaly import Monitor

RECIPE = "surveillance"
CONCURRENCY = 1  # scoring is CPU-heavy: one video at a time, others wait in the queue
MAX_FRAMES = 3000  # 5 minutes at 10 fps; longer uploads are cut here (the status says so)
UPDATE_SECONDS = 1.0  # at most one UI update per second: drawing the plot costs as much as scoring ~5 frames
BATCH = 8
ALERT_COLUMNS = ["start (s)", "end (s)", "duration (s)", "peak score", "peak at (s)", "frames"]


def load_monitor(path: Path) -> Monitor:
    # The scoring code (torch, the scorer) is imported on first use, not when the page is built.
    from tlkit.tasks.anomaly import stream

    return stream.load_monitor(path, device="auto")


def peak_heatmap(monitor: Monitor, frame: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """RGB overlay of the heat map on the frame, from the frame's patch `grid` kept while streaming (the task's
    `heatmap_overlay`, also what `tlkit watch` writes)."""
    from tlkit.tasks.anomaly.stream import heatmap_overlay

    return heatmap_overlay(monitor, frame, grid)


def alert_rows(events: list[dict], fps: float) -> list[list]:
    return [
        [
            round(e["start_s"], 2),
            round(e["end_s"], 2),
            round(e["end_s"] - e["start_s"], 2),
            float(f"{e['peak_score']:.3g}"),
            round(e["peak_frame"] / fps, 2),
            f"{e['start_frame']}-{e['end_frame']}",
        ]
        for e in events
    ]


def score_figure(snap: dict, threshold: float | None, expected_seconds: float | None = None):
    """Score over time: raw (thin), smoothed (bold), threshold (dashed), alert spans shaded."""
    from matplotlib.figure import Figure

    fps = snap["fps"]
    t = np.arange(snap["n"]) / fps
    fig = Figure(figsize=(9, 3.2), dpi=96, layout="constrained")
    ax = fig.subplots()
    for k, e in enumerate(snap["events"]):
        ax.axvspan(
            e["start_s"] - 0.5 / fps,
            e["end_s"] + 0.5 / fps,
            color="crimson",
            alpha=0.15,
            lw=0,
            label="alert" if k == 0 else None,
        )
    if snap["n"]:
        ax.plot(t, snap["scores"], color="0.6", lw=0.8, label="frame score")
        ax.plot(t, snap["smoothed"], color="tab:blue", lw=2.0, label=f"smoothed ({snap['window']} frames)")
        above = snap["smoothed"] >= threshold if threshold is not None else np.zeros(snap["n"], bool)
        ax.scatter(t[above], snap["smoothed"][above], color="crimson", s=10, zorder=3, label="abnormal frame")
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="crimson", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlim(0, max(expected_seconds or 0, snap["n"] / fps, 1.0))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("anomaly score")
    fig.legend(loc="outside upper center", fontsize=8, ncols=5, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def status_line(snap: dict, total: int | None) -> str:
    n, fps = snap["n"], snap["fps"]
    of = f"/{total}" if total and not snap["done"] else ""
    head = "Done" if snap["done"] else "Processing"
    alerts = len(snap["events"])
    text = (
        f"{head}: {n}{of} frames ({n / fps:.1f} s of video at {fps:g} fps), {snap['speed']:.1f} frames/s. "
        f"{alerts} alert{'s' if alerts != 1 else ''}"
    )
    if snap["events"]:
        spans = (f"{e['start_s']:.1f}-{e['end_s']:.1f} s (peak {e['peak_score']:.3g})" for e in snap["events"])
        text += ": " + "; ".join(spans)
    text += "."
    if snap["truncated"]:
        text += f" Stopped after {MAX_FRAMES} frames (demo limit)."
    return text


def build_demo(checkpoint: str | Path | None = None, *, preload: bool = True) -> gr.Blocks:
    """The Gradio app for an anomaly `checkpoint` (default: the newest surveillance run, on first use).
    `preload=True` with a checkpoint loads the scorer now; otherwise on the first request."""
    service: Lazy[Monitor] = lazy_checkpoint(RECIPE, checkpoint, load_monitor)
    meta = checkpoint_meta(checkpoint) if checkpoint else None
    if checkpoint and preload:
        service.get()
    sample = data_root() / "ucsd_ped2" / "sample.mp4"
    empty_alerts = {"headers": ALERT_COLUMNS, "data": []}

    def on_analyze(video, files, url=""):
        from tlkit.tasks.anomaly import analyze_stream, open_source

        try:
            # a stream URL only when nothing was uploaded: the tabs keep their contents when switching
            frames, fps, total = open_source(video, files, None if video or files else url)
        except ValueError as e:
            raise gr.Error(str(e), title="Cannot use this input") from None
        monitor = service.get_for_request()
        fps = fps or monitor.fps
        expected = total / fps if total else None
        peak_index = None
        try:
            stream = analyze_stream(
                monitor, frames, fps, update_seconds=UPDATE_SECONDS, max_frames=MAX_FRAMES, batch_size=BATCH
            )
            for snap in stream:
                peak = snap["peak"]
                # Unchanged images are not sent again while streaming; the final update carries everything.
                peak_frame, peak_map = gr.skip(), gr.skip()
                if peak is not None and (peak["index"] != peak_index or snap["done"]):
                    if peak["index"] != peak_index:
                        # files, not arrays: the final update repeats the images (see image_file)
                        peak_index = peak["index"]
                        frame_png = image_file(peak["frame"], "peak_frame")
                        overlay = image_file(peak_heatmap(monitor, peak["frame"], peak["grid"]), "peak_heatmap")
                    caption = f"Most abnormal frame: t = {peak['t']:.1f} s, score {peak['score']:.2f}"
                    peak_frame, peak_map = gr.Image(value=frame_png, label=caption), overlay
                yield (
                    status_line(snap, total),
                    score_figure(snap, monitor.threshold, expected),
                    {"headers": ALERT_COLUMNS, "data": alert_rows(snap["events"], fps)},
                    peak_frame,
                    peak_map,
                )
        except ValueError as e:  # a frame that does not decode, an empty stream
            raise gr.Error(describe_error(e), title="Cannot read the input") from None

    with gr.Blocks(title="tlkit: CCTV anomaly detection") as demo:
        gr.Markdown(
            "# Abnormal events in CCTV video\nA one-class model learned what normal pedestrian traffic looks like "
            "(UCSD Ped2 training clips). Upload a clip: frames are scored as they stream in; the score adds how "
            "far the frame's most unusual patch is from everything seen in normal footage and how much faster "
            "than normal something moves, each in units of its spread on normal frames."
        )
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Tab("Video"):
                    video = gr.Video(
                        label="Video (mp4, avi, ...)", sources=["upload"], height=240, elem_id="video-input"
                    )
                    if sample.is_file():
                        gr.Examples(examples=[str(sample)], inputs=video, label="Example: UCSD Ped2 Test001")
                with gr.Tab("Frames"):
                    files = gr.File(label="Frame images (in name order)", file_count="multiple", file_types=["image"])
                with gr.Tab("Stream URL"):
                    url = gr.Textbox(
                        value="",
                        label="Camera or stream URL (rtsp://, http://...mjpg, .m3u8); scored live, newest frame first",
                        placeholder="rtsp://camera.local/stream1",
                        elem_id="stream-url",
                    )
                button = gr.Button("Analyse", variant="primary")
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
            with gr.Column(scale=3):
                plot = gr.Plot(label="Anomaly score over time")
                alerts = gr.Dataframe(
                    value=empty_alerts, headers=ALERT_COLUMNS, label="Alerts", interactive=False, elem_id="alerts"
                )
        with gr.Row():
            peak_frame = gr.Image(label="Most abnormal frame", height=260, format="png")
            peak_map = gr.Image(label="Heat map: where it differs from normal", height=260, format="png")
        with gr.Accordion("Live webcam (optional)", open=False):
            gr.Markdown(
                "Scores webcam frames as they arrive (about 2 per second). The model only knows the UCSD walkway, "
                "so any other scene scores as abnormal: this shows the streaming path, not a useful detector."
            )
            cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam", height=260)
            cam_plot = gr.Plot(label="Live score")
            cam_status = gr.Textbox(label="Live status", interactive=False)
            history = gr.State(None)  # (scores so far, previous frame)
        if meta:
            val = meta.get("val_metrics") or {}
            auroc = val.get("frame_auroc")
            gr.Markdown(
                f"Model: `{meta.get('arch')}` features, memory bank from `{Path(str(meta.get('data_root'))).name}`"
                + (f"; val frame AUROC {auroc:.3f}" if auroc is not None else "")
                + (f"; alert threshold {meta['threshold']:.2f}" if meta.get("threshold") is not None else "")
                + "."
            )

        button.click(
            on_analyze,
            inputs=[video, files, url],
            outputs=[status, plot, alerts, peak_frame, peak_map],
            api_name="analyze",
        )

        def on_webcam(frame, history):
            if frame is None:
                return gr.skip(), gr.skip(), history
            from tlkit.tasks.anomaly import score_live_frame

            monitor = service.get_for_request()
            scores, smoothed, alarm, history = score_live_frame(monitor, frame, history)
            snap = {
                "n": len(scores), "fps": 2.0, "window": monitor.smooth_window, "scores": np.asarray(scores),
                "smoothed": smoothed, "events": [], "peak": None, "speed": 0.0, "done": False, "truncated": False,
            }  # fmt: skip
            text = f"score {scores[-1]:.2f}, smoothed {smoothed[-1]:.2f}" + (" - ALERT" if alarm else "")
            return score_figure(snap, monitor.threshold), text, history

        cam.stream(
            on_webcam,
            inputs=[cam, history],
            outputs=[cam_plot, cam_status, history],
            stream_every=0.5,
            concurrency_limit=1,
            api_name=False,
        )
    return demo


# `gradio apps/surveillance/app.py` serves this; nothing is loaded until the first request.
demo = build_demo(os.environ.get("TLKIT_CHECKPOINT") or None, preload=False)

if __name__ == "__main__":
    app_main(RECIPE, build_demo, concurrency=CONCURRENCY)
