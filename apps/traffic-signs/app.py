"""Traffic-sign recognition demo (GTSRB, 43 classes): top-5 sign names with probabilities and Grad-CAM.

Run: `tlkit demo traffic-signs [--checkpoint runs/.../best.pt]` or
`python apps/traffic-signs/app.py --checkpoint ... --host 127.0.0.1 --port 7860`. `gradio
apps/traffic-signs/app.py` serves the module-level `demo` ($TLKIT_CHECKPOINT or the newest run).
Nothing heavy happens at import: the model loads on the first request, or in `build_demo(checkpoint)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlkit.paths import set_offline_env

set_offline_env()  # before gradio is imported

import gradio as gr  # noqa: E402

from tlkit.demo import app_main, example_files, image_file, model_service, upload_image, upload_or_error  # noqa: E402

RECIPE = "traffic-signs"
CONCURRENCY = 2  # CPU demo: two requests run at once, the rest wait in the queue
TOPK = 5


def predict(predictor, image, topk: int = TOPK, explain: bool = True) -> dict:
    """Pure prediction: image (path, bytes, PIL or RGB array) -> `{"label", "topk": [{"label",
    "probability"}, ...], "gradcam": HxWx3 uint8 | None}`."""
    result = predictor.predict(image, topk=topk)[0]
    out = {"label": result["label"], "index": result["index"], "topk": result["topk"], "gradcam": None}
    if explain:
        from tlkit.explain import gradcam

        _, out["gradcam"] = gradcam(predictor, image)
    return out


def build_demo(checkpoint: str | Path | None = None, *, preload: bool = True) -> gr.Blocks:
    """The Gradio app for `checkpoint` (default: the newest traffic-signs run, resolved on first use).
    `preload=True` with a checkpoint loads the model now; otherwise on the first request."""
    service, meta = model_service(RECIPE, checkpoint, preload=preload)
    examples = example_files(
        meta.get("data_root") if meta else None, "gtsrb", limit=8, class_ids=meta.get("class_ids") if meta else None
    )

    def on_submit(image_path):
        result = predict(service.get_for_request(), upload_or_error(image_path))
        scores = {t["label"]: t["probability"] for t in result["topk"]}
        return scores, image_file(result["gradcam"], "gradcam")  # not the array: see image_file

    with gr.Blocks(title="tlkit: traffic signs") as demo:
        gr.Markdown(
            "# Traffic-sign recognition\nUpload a photo of one traffic sign (cropped around the sign works best, "
            "like the GTSRB images) or pick an example, then press **Recognise**."
        )
        with gr.Row():
            with gr.Column():
                image = upload_image(
                    label="Traffic sign", sources=["upload", "clipboard"], height=300, elem_id="image-input"
                )
                button = gr.Button("Recognise", variant="primary")
                if examples:
                    gr.Examples(examples=examples, inputs=image, label="Examples from GTSRB val", examples_per_page=8)
            with gr.Column():
                top5 = gr.Label(label=f"Top {TOPK} signs", num_top_classes=TOPK, elem_id="top5")
                overlay = gr.Image(label="Grad-CAM: where the model looked", height=300, format="png")
        if meta:
            val = meta.get("val_metrics") or {}
            top1 = val.get("top1")
            roi = ((meta.get("recipe") or {}).get("data") or {}).get("roi_crop", False)
            gr.Markdown(
                f"Model: `{meta.get('arch')}`, {len(meta.get('classes', []))} classes, input "
                f"{meta.get('preprocessing', {}).get('img_size')} px"
                + (f", val top-1 {100 * top1:.1f}%." if top1 is not None else ".")
                + (
                    " It was trained on the sign's box cut from each frame; an upload or example has no box here and "
                    "is used whole, so crop photos tightly around the sign."
                    if roi
                    else ""
                )
            )
        button.click(on_submit, inputs=image, outputs=[top5, overlay], api_name="predict")
    return demo


# `gradio apps/traffic-signs/app.py` serves this; nothing is loaded until the first request.
demo = build_demo(os.environ.get("TLKIT_CHECKPOINT") or None, preload=False)

if __name__ == "__main__":
    app_main(RECIPE, build_demo, concurrency=CONCURRENCY)
