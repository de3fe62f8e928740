"""The browser demo (``timm-acsi demo``, and ``app.py`` for a Hugging Face Space): upload a photo or take a webcam
snapshot, see every face boxed and labelled, its class probabilities and attention map, and the results as a
table and CSV. Gradio (``pip install "timm-acsi[demo]"``) is imported only when the page is built; the pictures,
table and messages are plain functions of an :class:`~timm_acsi.inference.ImageResult`."""

from .page import (
    SHIPPED_TAGS,
    PageResult,
    build_app,
    default_examples,
    import_gradio,
    launch,
    load_recognizers,
    predict_page,
)
from .render import (
    MAX_PIXELS,
    MAX_SIDE,
    ImageTooLargeError,
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
    "build_app",
    "default_examples",
    "import_gradio",
    "launch",
    "load_recognizers",
    "predict_page",
    "MAX_PIXELS",
    "MAX_SIDE",
    "ImageTooLargeError",
    "cam_tiles",
    "error_message",
    "probability_chart",
    "read_upload",
    "results_csv",
    "results_table",
    "summary_message",
]
