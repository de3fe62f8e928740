"""Hugging Face Space entry point (``app_file: app.py``, Gradio SDK): the timm-acsi browser demo with the FER-2013
weights that ship with the package, on CPU, offline. Locally, ``timm-acsi demo`` does the same with options."""

from timm_acsi.demo import SHIPPED_TAGS, build_app, default_examples, launch, load_recognizers

demo = build_app(load_recognizers(SHIPPED_TAGS), examples=default_examples())

if __name__ == "__main__":
    launch(demo)  # a Space sets GRADIO_SERVER_NAME/PORT; run locally it serves 127.0.0.1:7860; uploads up to 50 MB
