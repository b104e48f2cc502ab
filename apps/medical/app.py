"""Medical imaging demo: chest X-ray pneumonia or malaria blood-cell classification, with Grad-CAM.

A research demo, not a diagnosis. Run: `tlkit demo medical [--checkpoint runs/.../best.pt]` or
`python apps/medical/app.py --checkpoint ... --host 127.0.0.1 --port 7860`. `gradio apps/medical/app.py`
(hot reload) serves the module-level `demo`, which uses $TLKIT_CHECKPOINT or the newest medical run.
Nothing heavy happens at import: the model loads on the first request, or in `build_demo(checkpoint)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlkit.paths import set_offline_env

set_offline_env()  # before gradio is imported

import gradio as gr  # noqa: E402

from tlkit.demo import app_main, example_files, image_file, model_service, upload_image, upload_or_error  # noqa: E402

RECIPE = "medical"
CONCURRENCY = 2  # CPU demo: two requests run at once, the rest wait in the queue
DISCLAIMER = (
    "**Research demo, not a diagnosis.** This model was trained on a small public dataset for teaching "
    "transfer learning. It has not been validated clinically and must not be used for medical decisions."
)
CSS = ".disclaimer {border-left: 6px solid #d97706; background: #fffbeb; padding: 8px 12px; border-radius: 4px}"
DATASETS = {
    "chest_xray": ("Chest X-ray: pneumonia", "Chest radiograph"),
    "malaria": ("Malaria: parasitized blood cells", "Thin-smear blood-cell image"),
}


# heldout_*: cross-fitted on val (each half judged by the threshold/temperature fitted on the other half); the
# plain sensitivity/specificity are in-sample (threshold fitted on the same images), shown only without them.
VAL_KEYS = ("sensitivity", "specificity", "heldout_sensitivity", "heldout_specificity", "auroc", "n", "accuracy")


def predict(predictor, image, explain: bool = True) -> dict:
    """Pure prediction: image (path, bytes, PIL or RGB array) -> JSON-able result plus an overlay.

    `{"label", "probabilities": {class: p}, "decision": {...} | None, "val": {sensitivity, specificity,
    ...}, "gradcam": HxWx3 uint8 | None}`; `decision` is the call at the checkpoint's threshold."""
    result = predictor.predict(image, topk=len(predictor.classes))[0]
    out = {
        "label": result["label"],
        "probabilities": {t["label"]: t["probability"] for t in result["topk"]},
        "decision": result.get("decision"),
        "val": {k: predictor.val_metrics.get(k) for k in VAL_KEYS},
        "gradcam": None,
    }
    if explain:
        from tlkit.explain import gradcam

        _, out["gradcam"] = gradcam(predictor, image)
    return out


def dicom_or_error(path):
    """An uploaded DICOM file -> RGB array (window / LUTs applied as a viewer would), or a message in the UI."""
    from tlkit.data.io import ImageDecodeError, describe_error, load_rgb_array

    try:
        return load_rgb_array(path)
    except (ImageDecodeError, OSError) as e:
        raise gr.Error(f"{Path(path).name}: {describe_error(e, path)}", title="Cannot use this DICOM file") from None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def decision_markdown(result: dict) -> str:
    decision, val = result["decision"], result["val"]
    if decision is None:
        return f"### Most likely: **{result['label']}**"
    pos = decision["positive_class"]
    relation = "≥" if decision["positive"] else "<"
    lines = [
        f"### Decision: **{decision['label']}**",
        f"P({pos}) = {decision['score']:.3f} {relation} threshold {decision['threshold']:.3f} "
        "(the threshold was chosen on the validation set).",
    ]
    n = f", n = {val['n']}" if val.get("n") else ""
    if val.get("heldout_sensitivity") is not None or val.get("heldout_specificity") is not None:
        lines.append(
            f"On held-out val (2-fold cross-fit: each half scored with the threshold fitted on the other{n}): "
            f"sensitivity {_fmt(val.get('heldout_sensitivity'))}, specificity {_fmt(val.get('heldout_specificity'))}"
            f"; AUROC {_fmt(val.get('auroc'))}."
        )
    elif val.get("sensitivity") is not None or val.get("specificity") is not None:
        lines.append(
            f"In-sample on val (the threshold was fitted on these images{n}, so optimistic): "
            f"sensitivity {_fmt(val.get('sensitivity'))}, specificity {_fmt(val.get('specificity'))}, "
            f"AUROC {_fmt(val.get('auroc'))}."
        )
    return "\n\n".join(lines)


def model_markdown(meta: dict | None) -> str:
    if not meta:
        return "Model: the newest `tlkit finetune --recipe medical` run (loaded on the first request)."
    pre, val = meta.get("preprocessing", {}), meta.get("val_metrics") or {}
    return (
        f"Model: `{meta.get('arch')}` fine-tuned on `{Path(str(meta.get('data_root', '?'))).name}` "
        f"({', '.join(meta.get('classes', []))}), input {pre.get('img_size')} px. "
        f"Validation: accuracy {_fmt(val.get('accuracy'))}, AUROC {_fmt(val.get('auroc'))}."
    )


def build_demo(checkpoint: str | Path | None = None, *, preload: bool = True) -> gr.Blocks:
    """The Gradio app for `checkpoint` (default: the newest medical run, resolved on first use).
    `preload=True` with a checkpoint loads the model now; otherwise on the first request."""
    service, meta = model_service(RECIPE, checkpoint, preload=preload)
    dataset = Path(str(meta.get("data_root", ""))).name if meta else ""
    title, input_label = DATASETS.get(dataset, ("Medical image classification", "Chest X-ray or blood-cell image"))
    fallback = dataset or (meta or {}).get("recipe", {}).get("data", {}).get("name", "chest_xray")
    examples = example_files(meta.get("data_root") if meta else None, fallback, per_class=2, limit=4)

    def on_submit(image_path, dicom_path=None):
        image = dicom_or_error(dicom_path) if dicom_path else upload_or_error(image_path)
        result = predict(service.get_for_request(), image)
        overlay_png = image_file(result["gradcam"], "gradcam")  # not the array: see image_file
        return result["probabilities"], decision_markdown(result), overlay_png

    with gr.Blocks(title=f"tlkit: {title}") as demo:
        gr.Markdown(f"# {title}\nUpload an image or pick an example, then press **Analyse**.")
        gr.Markdown(DISCLAIMER, elem_classes=["disclaimer"], elem_id="disclaimer")
        with gr.Row():
            with gr.Column():
                image = upload_image(
                    label=input_label, sources=["upload", "clipboard"], height=320, elem_id="image-input"
                )
                # The image box takes what a browser can show; DICOM goes through a file box (tlkit.data.dicom).
                dicom = gr.File(label="...or a DICOM file (.dcm)", file_types=[".dcm"], height=80, elem_id="dicom")
                button = gr.Button("Analyse", variant="primary")
                if examples:
                    gr.Examples(examples=examples, inputs=image, label="Examples from the validation split")
            with gr.Column():
                probs = gr.Label(label="Class probabilities", num_top_classes=2, elem_id="probabilities")
                decision = gr.Markdown(elem_id="decision")
                overlay = gr.Image(label="Grad-CAM: regions that drove the prediction", height=320, format="png")
        gr.Markdown(model_markdown(meta))
        button.click(on_submit, inputs=[image, dicom], outputs=[probs, decision, overlay], api_name="predict")
    return demo


# `gradio apps/medical/app.py` serves this; nothing is loaded until the first request.
demo = build_demo(os.environ.get("TLKIT_CHECKPOINT") or None, preload=False)

if __name__ == "__main__":
    app_main(RECIPE, build_demo, concurrency=CONCURRENCY, css=CSS)
