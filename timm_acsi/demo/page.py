"""The demo's web page (Gradio Blocks) around recognizers loaded once, before the server starts.

Gradio is imported only by :func:`import_gradio` (``pip install "timm-acsi[demo]"``), so the rest of this
module, :func:`predict_page` included, runs and is tested without it. Uploads reach :func:`predict_page` as
Gradio's raw file payload (the event runs with ``preprocess=False``): the file is read here, so an unreadable
or huge one becomes a message on the page instead of an error in Gradio's own image decoding.
"""

import atexit
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from PIL import Image

from ..extras import import_extra
from ..inference import DEFAULT_MODEL, ExpressionRecognizer, ImageResult, annotate
from ..models.coresnet import FER2013_SHIPPED
from .render import (
    cam_tiles,
    error_message,
    probability_chart,
    read_upload,
    results_csv,
    results_table,
    summary_message,
)

__all__ = [
    "SHIPPED_TAGS",
    "PageResult",
    "import_gradio",
    "load_recognizers",
    "default_examples",
    "predict_page",
    "build_app",
    "launch",
]

#: The tags whose weights ship inside the package: always offered, they load offline. The predictor's default
#: model comes first, so it is the one preselected when no ``--model`` is given.
SHIPPED_TAGS = tuple(sorted((f"{m}.fer2013" for m in FER2013_SHIPPED), key=lambda tag: tag != DEFAULT_MODEL))
#: Example photos that ship with the package (package data), offered under the photo input.
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: Uploads above this are refused by Gradio before they reach the model.
MAX_FILE_SIZE = "50mb"
INTRO = """\
# Facial expression recognition with ACSI-Net

Upload a photo or take a webcam snapshot. Every face the detector finds (OpenCV's frontal-face Haar cascade)
is boxed and numbered, its expression is recognised (anger, disgust, fear, happiness, sadness, surprise,
neutral), and the class activation map (CAM) shows where the network found the evidence for its answer
(red: most). Photos are processed by the server running this page (your own computer when you run
`timm-acsi demo`) and are not sent to any other service.
"""
PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)


def import_gradio() -> Any:
    """The ``gradio`` module with its telemetry off, or :class:`~timm_acsi.extras.MissingExtraError` (an ImportError)
    naming ``pip install "timm-acsi[demo]"``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return import_extra("gradio", "demo", "The browser demo")


def load_recognizers(
    sources: Sequence[str], detector: str = "haar", device: str = "cpu", tta_flip: bool = False
) -> Dict[str, ExpressionRecognizer]:
    """One recognizer per distinct model source, loaded now (no request ever loads a model). ``.onnx`` files
    run with onnxruntime (no attention maps); every other source as :func:`timm_acsi.sources.load_model`.
    ``tta_flip``: every face is averaged with its mirror image (see :class:`ExpressionRecognizer`)."""
    recognizers = {}
    for source in dict.fromkeys(str(s) for s in sources):
        if source.endswith(".onnx"):
            for module in ("onnxruntime", "onnx"):
                import_extra(module, "onnx", f"Running {source}")
            from ..export.ort_backend import OnnxBackend

            recognizers[source] = ExpressionRecognizer(OnnxBackend(source), detector=detector, tta_flip=tta_flip)
        else:
            recognizers[source] = ExpressionRecognizer(source, detector=detector, device=device, tta_flip=tta_flip)
    return recognizers


def default_examples() -> List[Path]:
    """The example photos that ship with the package (``timm_acsi/demo/examples/``), in name order."""
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


@dataclass
class PageResult:
    """What the page shows after one request; everything but ``message`` is empty when it failed."""

    message: str
    annotated: Optional[Image.Image] = None
    charts: List[Tuple[Image.Image, str]] = field(default_factory=list)
    cams: List[Tuple[Image.Image, str]] = field(default_factory=list)
    table: Optional[Dict[str, list]] = None  # {"headers": [...], "data": [[...], ...]}
    csv: Optional[Path] = None

    def outputs(self) -> Tuple[Any, ...]:
        """The values of the page's output components, in :func:`build_app`'s order."""
        csv = None if self.csv is None else str(self.csv)
        return self.message, self.annotated, self.charts, self.cams, self.table, csv


def predict_page(
    recognizer: ExpressionRecognizer,
    model: str,
    detector: str,
    upload: Optional[Mapping[str, Any]],
    workdir: Path,
) -> PageResult:
    """Everything the page shows for one upload (Gradio's file payload: ``path``, ``orig_name``): the annotated
    image, a chart and a CAM per face, the table and a CSV file written under ``workdir``. Bad input, and any
    failure, become a message (failures are logged with their traceback for the server's owner)."""
    if not upload or not upload.get("path"):
        return PageResult("Upload a photo or take a webcam snapshot.")
    name = Path(upload.get("orig_name") or upload["path"]).name
    try:
        image, original = read_upload(Path(upload["path"]), name)
        attention = "cam" if hasattr(recognizer.backend, "attention") else None
        result = recognizer(image, attention=attention, sources=[name])
    except Exception as e:  # a web page shows a message, never a traceback
        if not isinstance(e, (ValueError, OSError)):
            log.exception("demo request on %s failed", name)
        return PageResult(error_message(e))
    message = summary_message(result, model, detector, original)
    if attention is None and result.faces:
        message += "\n\nNo attention maps: they need the PyTorch model, and this one runs with onnxruntime."
    page = PageResult(message, annotated=annotate(image, result))
    if result.faces:
        names = recognizer.label_names
        page.charts = [(probability_chart(face, i), f"face {i}: {face.label}") for i, face in enumerate(result)]
        page.cams = cam_tiles(result)
        headers, rows = results_table(result, names)
        page.table = {"headers": headers, "data": rows}
        page.csv = Path(tempfile.mkdtemp(dir=workdir)) / f"{Path(name).stem}_expressions.csv"
        page.csv.write_text(results_csv(result, names, name))
    return page


def build_app(
    recognizers: Mapping[str, ExpressionRecognizer],
    detector: str = "haar",
    examples: Sequence[PathLike] = (),
    workdir: Optional[PathLike] = None,
) -> Any:
    """The page as a ``gradio.Blocks``: photo (upload, webcam, clipboard), model choice and examples on the left;
    message, annotated image, per-face probability charts and CAMs, the table and its CSV on the right. A new
    photo or model runs the prediction. CSV files go to ``workdir`` (default: a temporary folder removed at exit).
    """
    gr = import_gradio()
    if not recognizers:
        raise ValueError("The demo needs at least one model.")
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="timm-acsi-demo-")
        atexit.register(shutil.rmtree, workdir, True)
    workdir = Path(workdir)
    names = list(recognizers)

    def respond(upload: Optional[Dict[str, Any]], model: str) -> Tuple[Any, ...]:
        if model not in recognizers:
            return PageResult(f"**Unknown model** {model!r}: choose one of {', '.join(names)}.").outputs()
        return predict_page(recognizers[model], model, detector, upload, workdir).outputs()

    with gr.Blocks(title="timm-acsi: facial expressions", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                photo = gr.Image(
                    label="Photo", sources=["upload", "webcam", "clipboard"], type="filepath", elem_id="photo"
                )
                model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                if examples:
                    gr.Examples(
                        [[str(p)] for p in examples], inputs=photo, label="Examples: click one", elem_id="examples"
                    )
            with gr.Column(scale=3):
                message = gr.Markdown("Upload a photo or take a webcam snapshot.", elem_id="message")
                annotated = gr.Image(label="Faces", type="pil", format="png", interactive=False, elem_id="annotated")
        with gr.Row():
            gallery = dict(columns=3, height=300, object_fit="contain", format="png", interactive=False)
            charts = gr.Gallery(label="Class probabilities per face", elem_id="charts", **gallery)
            cams = gr.Gallery(label="Attention (CAM) per face", elem_id="cams", **gallery)
        headers, _ = results_table(ImageResult([], 0, 0), recognizers[names[0]].label_names)
        table = gr.Dataframe(headers=headers, label="Results", interactive=False, elem_id="table")
        csv = gr.File(label="Results as CSV (download)", interactive=False, elem_id="csv")
        gr.on(
            [photo.change, model.change],
            respond,
            inputs=[photo, model],
            outputs=[message, annotated, charts, cams, table, csv],
            preprocess=False,
            api_name="predict",
        )
    return app


def launch(app: Any, host: Optional[str] = None, port: Optional[int] = None, share: bool = False) -> None:
    """Serve ``app`` until interrupted: on ``host`` only, no public link unless ``share``, uploads up to
    :data:`MAX_FILE_SIZE`. ``None`` host or port: Gradio's own choice (``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT``, as a Space sets them, else 127.0.0.1 and the first free port from 7860)."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_FILE_SIZE,
    )
