"""The browser demo: the upload reader, charts, CAM tiles, table, CSV and messages (plain functions), the command
line, and the page itself served by ``python -m timm_acsi.cli.demo`` and driven in Debian's headless Chromium."""

import configparser
import csv
import io
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import timm_acsi.demo as demo_pkg
from timm_acsi import FER7_LABELS
from timm_acsi.cli import demo as demo_cli
from timm_acsi.demo import (
    ImageTooLargeError,
    cam_tiles,
    default_examples,
    error_message,
    import_gradio,
    launch,
    load_recognizers,
    predict_page,
    probability_chart,
    read_upload,
    results_csv,
    results_table,
    summary_message,
)
from timm_acsi.demo.render import BAR_COLOR, CAM_TILE
from timm_acsi.extras import MissingExtraError
from timm_acsi.inference import ExpressionRecognizer, ImageResult, UnreadableImageError, load_image
from timm_acsi.inference.draw import BOX_COLOR

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags, Chromium on a closed network stalls on its own update/sync requests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CSV_HEADER = ["file", "frame", "face", "x", "y", "w", "h", "detection_score", "label", "score", *FER7_LABELS]
#: Set to a path to keep the browser test's screenshot (how docs/images/demo.png was made).
SCREENSHOT_ENV = "TIMM_ACSI_DEMO_SCREENSHOT"
#: Generous limits for a busy CI machine: the server starts (imports, model) and answers in seconds when idle.
SERVER_START_S = 180
PAGE_WAIT_MS = 120_000


def two_faces() -> np.ndarray:
    """scikit-image's astronaut (NASA, public domain) beside its mirror image, 800x400: OpenCV 4.x's Haar cascade
    finds exactly the two faces (at 1024x512 it also fires on a 25-pixel patch of the suit)."""
    a = skdata.astronaut()
    both = Image.fromarray(np.concatenate([a, a[:, ::-1]], axis=1))
    return np.asarray(both.resize((800, 400), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def rec():
    return ExpressionRecognizer("acsinet18.fer2013")  # the shipped weights: offline


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronauts.png"
    Image.fromarray(two_faces()).save(path)
    return path


@pytest.fixture(scope="module")
def result(rec, photo):
    return rec(load_image(photo), attention="cam")


def test_the_test_photo_has_two_faces_with_attention_maps(result):
    assert len(result) == 2 and not result.skipped
    assert [f.box[0] < 400 for f in result] == [True, False]  # numbered left to right
    assert all(f.attention is not None for f in result)
    assert [f.label for f in result] == ["happiness", "happiness"]  # the astronaut smiles, in both halves


# ------------------------------------------------------------------------------------------ upload reader


def test_read_upload_keeps_small_images_and_downscales_large_ones_upright(tmp_path):
    small = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    array, original = read_upload(tmp_path / "small.png", "small.png")
    np.testing.assert_array_equal(array, small)
    assert original is None

    Image.new("RGB", (2400, 1200), (200, 100, 50)).save(tmp_path / "wide.png")
    array, original = read_upload(tmp_path / "wide.png", "wide.png")
    assert array.shape == (800, 1600, 3) and original == (2400, 1200)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show upright
    Image.new("RGB", (2000, 1000), (10, 200, 10)).save(tmp_path / "phone.jpg", exif=exif)
    array, original = read_upload(tmp_path / "phone.jpg", "phone.jpg")
    assert array.shape == (1600, 800, 3) and original == (1000, 2000)


def test_read_upload_refuses_non_images_broken_and_huge_images_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo\n")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "broken.png").write_bytes(buffer.getvalue()[:60])
    for name in ("notes.txt", "broken.png"):
        with pytest.raises(UnreadableImageError) as caught:
            read_upload(tmp_path / name, name)
        message = error_message(caught.value)
        assert message.startswith("**Cannot read this file:**") and name in message and str(tmp_path) not in message
    with pytest.raises(ImageTooLargeError) as caught:
        read_upload(tmp_path / "broken.png", "broken.png", max_pixels=1000)
    assert error_message(caught.value).startswith("**Image too large:** broken.png is 64x64 pixels")


# ------------------------------------------------------------------------------------- pictures and table


def test_probability_chart_draws_one_bar_per_class_the_predicted_one_highlighted(result):
    face = result[0]
    chart = np.asarray(probability_chart(face, 0))
    assert chart.shape == (8 + 26 + 8 + 26 * 7 + 8, 320, 3)  # title row, then one 26-pixel row per class
    rows = chart[55 + 26 * np.arange(7)]  # the middle line of each class's row
    highlighted = np.all(rows == BOX_COLOR, axis=-1).sum(axis=1)
    others = np.all(rows == BAR_COLOR, axis=-1).sum(axis=1)
    assert np.flatnonzero(highlighted).tolist() == [FER7_LABELS.index(face.label)]  # the predicted class alone
    widths = highlighted + others
    assert (widths > 0).all()  # a bar for every class, in output order, long as its probability
    probabilities = np.array([face.probabilities[name] for name in FER7_LABELS])
    scale = widths.max() / probabilities.max()
    np.testing.assert_allclose(widths, np.maximum(1, probabilities * scale), atol=2)


def test_cam_tiles_are_the_attention_overlays_enlarged_and_captioned(result):
    tiles = cam_tiles(result)
    assert [caption for _, caption in tiles] == [f"face {i}: CAM of {f.attention.label}" for i, f in enumerate(result)]
    for (tile, _), face in zip(tiles, result):
        assert max(tile.size) == CAM_TILE
        small = np.asarray(tile.resize(face.attention.overlay.shape[1::-1], Image.Resampling.BILINEAR), dtype=float)
        assert np.abs(small - face.attention.overlay).mean() < 12
    assert cam_tiles(ImageResult([], 10, 10)) == []


def test_table_and_csv_hold_every_face_and_class(result):
    headers, rows = results_table(result, FER7_LABELS)
    assert headers == ["face", "x", "y", "w", "h", "detector score", "label", "score", *FER7_LABELS]
    assert [r[0] for r in rows] == [0, 1] and [r[6] for r in rows] == [f.label for f in result]
    assert [tuple(r[1:5]) for r in rows] == [f.box for f in result]
    parsed = list(csv.reader(io.StringIO(results_csv(result, FER7_LABELS, "astronauts.png"))))
    assert parsed[0] == CSV_HEADER  # the columns of timm-acsi predict --csv
    for row, face in zip(parsed[1:], result):
        assert row[0] == "astronauts.png" and row[8] == face.label
        np.testing.assert_allclose([float(v) for v in row[10:]], list(face.probabilities.values()), atol=1e-6)
    assert len(parsed) == 3


def test_messages_count_faces_explain_misses_and_never_show_internals(result):
    assert summary_message(result, "m", "haar") == "**2 faces** found by the haar detector, model `m`."
    empty = ImageResult([], 451, 300)
    assert "**No face found** in this 451x300 image. The Haar detector finds frontal" in summary_message(
        empty, "m", "haar"
    )
    assert "Downscaled from 4000x2000 to 800x400" in summary_message(result, "m", "haar", (4000, 2000))
    assert error_message(RuntimeError("/secret/path exploded")) == (
        "**Something went wrong** (RuntimeError); the server's log has the details."
    )


def test_predict_page_shows_everything_or_one_message(rec, photo, result, tmp_path, caplog):
    page = predict_page(rec, "acsinet18.fer2013", "haar", {"path": str(photo), "orig_name": "mine.png"}, tmp_path)
    assert page.message.startswith("**2 faces** found by the haar detector, model `acsinet18.fer2013`")
    assert page.annotated.size == (800, 400)
    assert [c for _, c in page.charts] == [f"face {i}: {f.label}" for i, f in enumerate(result)]
    assert len(page.cams) == 2 and len(page.table["data"]) == 2
    assert page.csv.name == "mine_expressions.csv" and page.csv.parent.parent == tmp_path
    assert page.csv.read_text() == results_csv(result, FER7_LABELS, "mine.png")

    assert predict_page(rec, "m", "haar", None, tmp_path).message == "Upload a photo or take a webcam snapshot."
    (tmp_path / "notes.txt").write_text("hello")
    bad = predict_page(rec, "m", "haar", {"path": str(tmp_path / "notes.txt"), "orig_name": "notes.txt"}, tmp_path)
    assert bad.message.startswith("**Cannot read this file:** notes.txt") and bad.outputs()[1:] == (
        None,
        [],
        [],
        None,
        None,
    )

    class Broken:
        backend = rec.backend

        def __call__(self, *args, **kwargs):
            raise RuntimeError("boom")

    failed = predict_page(Broken(), "m", "haar", {"path": str(photo)}, tmp_path)
    assert failed.message.startswith("**Something went wrong** (RuntimeError)")
    assert "boom" in caplog.text  # the traceback goes to the server's log


# ------------------------------------------------------------------------------------------- command line


def test_cli_defaults_bad_port_and_bad_model(tmp_path, capsys, monkeypatch):
    args = demo_cli.build_parser("timm-acsi demo").parse_args([])
    assert (args.host, args.port, args.share, args.model, args.detector) == ("127.0.0.1", 7860, False, None, "haar")
    assert args.tta_flip is False
    assert demo_cli.build_parser("timm-acsi demo").parse_args(["--tta-flip"]).tta_flip is True
    with pytest.raises(SystemExit):
        demo_cli.build_parser("timm-acsi demo").parse_args(["--port", "70000"])
    assert "a port is at most 65535" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="No such checkpoint or folder"):
        demo_cli.main(["--model", str(tmp_path / "missing-run")])
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the extra were not installed
    for call in (import_gradio, lambda: demo_cli.main([])):
        with pytest.raises(MissingExtraError, match=r'The browser demo needs gradio, .*"timm-acsi\[demo\]"'):
            call()


def test_recognizers_can_average_each_face_with_its_mirror(photo, result):
    """--tta-flip reaches every recognizer, and changes the probabilities the page shows."""
    (tta,) = load_recognizers(["acsinet18.fer2013"], tta_flip=True).values()
    assert tta.tta_flip is True
    flipped = tta(load_image(photo))
    assert [f.box for f in flipped] == [f.box for f in result]
    assert any(abs(a.score - b.score) > 1e-3 for a, b in zip(flipped, result))


def test_example_photos_ship_inside_the_package():
    """The examples live in the package (package_data), not in docs/, so an installed demo offers them too."""
    examples = default_examples()
    assert [p.name for p in examples] == ["astronauts.jpg", "cat.jpg"]
    assert all(p.parent.parent.name == "demo" and p.parent.parent.parent.name == "timm_acsi" for p in examples)
    assert [Image.open(p).size for p in examples] == [(800, 400), (451, 300)]


def test_importing_the_demo_package_does_not_import_gradio():
    code = "import sys, timm_acsi.demo; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout: float = SERVER_START_S) -> float:
    """Seconds until ``url`` answers 200 (the server printed its URL), or fail with the server's output."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not answer within {timeout} s:\n{log.read_text()}")


def _playwright_missing() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM} (Debian: apt-get install chromium)")
@pytest.mark.skipif(_playwright_missing(), reason="playwright is not installed (pip install playwright)")
@pytest.mark.skipif(sys.version_info < (3, 10), reason="Gradio 6 needs Python 3.10+")
def test_page_in_headless_chromium(photo, result, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "timm_acsi.cli.demo", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,  # not the checkout: the examples must be served from anywhere
        )
    try:
        seconds = _wait_until_served(url, server, log)
        print(f"demo served after {seconds:.1f} s")
        (tmp_path / "notes.txt").write_text("not a photo\n")
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(PAGE_WAIT_MS)
                expect.set_options(timeout=PAGE_WAIT_MS)
                requested = []
                page.on("request", lambda r: requested.append(r.url))
                page.goto(url)
                page.locator("#photo input[type=file]").set_input_files(str(photo))
                expect(page.locator("#message")).to_contain_text("2 faces found")
                for i, face in enumerate(result):
                    expect(page.locator("#charts")).to_contain_text(f"face {i}: {face.label}")
                    expect(page.locator("#cams")).to_contain_text(f"face {i}: CAM of {face.attention.label}")
                    expect(page.locator("#table")).to_contain_text(face.label)
                expect(page.locator("#annotated img")).to_be_visible()
                expect(page.locator("#cams img")).to_have_count(2)
                page.wait_for_function(  # the overlays are loaded images, not broken links
                    "() => [...document.querySelectorAll('#cams img')].every(i => i.complete && i.naturalWidth > 0)"
                )
                shot = page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
                if os.environ.get(SCREENSHOT_ENV):
                    shutil.copyfile(tmp_path / "demo.png", os.environ[SCREENSHOT_ENV])

                page.reload()
                page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
                expect(page.get_by_text("Invalid file type")).to_be_visible()  # refused by the page itself
                page.reload()
                page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "broken.png"))
                expect(page.locator("#message")).to_contain_text("Cannot read this file: broken.png")
                page.locator("#examples img").nth(1).click()  # timm_acsi/demo/examples/cat.jpg
                expect(page.locator("#message")).to_contain_text("No face found in this 451x300 image")
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    assert Image.open(tmp_path / "demo.png").size[0] == 1280
    remote = [u for u in requested if not u.startswith(("data:", "blob:")) and urlparse(u).hostname != "127.0.0.1"]
    assert not remote, f"the page requested {remote}"
    text = log.read_text()
    assert "timm-acsi demo: 2 models loaded in" in text and "acsinet18.fer2013, coresnet18.fer2013" in text
    assert f"http://127.0.0.1:{port}" in text


class _FakeApp:
    def __init__(self):
        self.launched = []

    def launch(self, **kwargs):
        self.launched.append(kwargs)


def test_launch_limits_uploads_locally_and_on_a_space(monkeypatch):
    """``timm-acsi demo`` and a Space's ``app.py`` both serve through ``launch``: uploads up to 50 MB either way."""
    app = _FakeApp()
    launch(app, "0.0.0.0", 8000, share=True)
    assert app.launched == [dict(server_name="0.0.0.0", server_port=8000, share=True, max_file_size="50mb")]

    space = _FakeApp()
    monkeypatch.setattr(demo_pkg, "load_recognizers", lambda tags: list(tags))
    monkeypatch.setattr(demo_pkg, "build_app", lambda recognizers, examples: space)
    runpy.run_path(str(Path(__file__).parents[1] / "app.py"), run_name="__main__")
    assert space.launched == [dict(server_name=None, server_port=None, share=False, max_file_size="50mb")]


def test_space_requirements_install_this_checkout_with_the_demo_extra():
    """A Hugging Face Space of this repository installs requirements.txt: the checkout itself, with Gradio."""
    root = Path(__file__).parents[1]
    lines = [line.strip() for line in (root / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == [".[demo]"]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    assert any(req.startswith("gradio") for req in setup["options.extras_require"]["demo"].split("\n"))
