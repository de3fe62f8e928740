"""The expression recognizer's API: preprocessing equal to timm's, detection on real photos (scikit-image's
bundled astronaut and cat), crops, batching, grayscale models, CAM and Grad-CAM, video frames."""

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from timm_acsi import FER7_LABELS
from timm_acsi.checkpoint import save_checkpoint
from timm_acsi.inference import (
    Detection,
    ExpressionRecognizer,
    HaarFaceDetector,
    Preprocessor,
    UnreadableImageError,
    UnreadableVideoError,
    annotate,
    jet,
    load_image,
    read_frames,
    square_box,
    to_rgb_array,
)
from timm_acsi.inference.cam import class_activation_maps, grad_cam
from timm_acsi.sources import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

ASTRONAUT_FACE = (177, 67, 93, 93)  # OpenCV 4.x's frontal-face cascade on skimage.data.astronaut()


def _meta(arch="acsinet18", size=48, grayscale=False):
    return dict(
        architecture=arch,
        num_classes=7,
        label_names=list(FER7_LABELS),
        model_args={},
        input_size=[3, size, size],
        crop_pct=size / (size + 8),
        grayscale=grayscale,
        dataset="test",
    )


def _checkpoint(path, arch="acsinet18", size=48, grayscale=False, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=7)
    with torch.no_grad():  # a visible spread of probabilities, so equalities below are not between constants
        model.get_classifier().weight.mul_(50)
    save_checkpoint(path, model.state_dict(), _meta(arch, size, grayscale))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "acsinet18": _checkpoint(root / "acsi" / "best.safetensors"),
        "gray": _checkpoint(root / "gray" / "best.safetensors", grayscale=True),
        "resnet18": _checkpoint(root / "resnet" / "best.safetensors", arch="resnet18", size=64),
    }


@pytest.fixture(scope="module")
def rec(ckpts):
    return ExpressionRecognizer(str(ckpts["acsinet18"]))


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()


@pytest.fixture(scope="module")
def face_crop(astronaut):
    x, y, w, h = square_box(ASTRONAUT_FACE, 0.2, astronaut.shape[1], astronaut.shape[0])
    return np.ascontiguousarray(astronaut[y : y + h, x : x + w])


def _reference_probs(model_path, crop, grayscale=False):
    """Probabilities computed the plain timm way: timm's eval transform and the model, no recognizer code."""
    loaded = load_model(str(model_path))
    img = Image.fromarray(crop)
    if grayscale:
        img = img.convert("L").convert("RGB")
    x = timm.data.create_transform(**loaded.data_config)(img).unsqueeze(0)
    with torch.no_grad():
        return loaded.model(x).softmax(-1)[0].numpy()


# ------------------------------------------------------------------------------------------- preprocessing

CONFIGS = {
    "bilinear": dict(
        input_size=(3, 48, 48),
        interpolation="bilinear",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=48 / 56,
        crop_mode="center",
    ),
    "bicubic": dict(
        input_size=(3, 224, 224),
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        crop_pct=0.95,
        crop_mode="center",
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(97, 130), (130, 97), (40, 40), (301, 300)])
def test_preprocessing_equals_timm_eval_transform(name, shape):
    cfg = CONFIGS[name]
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = timm.data.create_transform(**cfg)(Image.fromarray(image)).numpy()
    out = Preprocessor(cfg)([image])
    assert out.shape == (1, *expected.shape) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_grayscale_preprocessing_is_gray_replicated():
    image = np.random.default_rng(0).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    cfg = CONFIGS["bilinear"]
    expected = timm.data.create_transform(**cfg)(Image.fromarray(image).convert("L").convert("RGB")).numpy()
    np.testing.assert_allclose(Preprocessor(cfg, grayscale=True)([image])[0], expected, rtol=0, atol=1e-6)


def test_square_box_margin_and_border():
    assert square_box((100, 100, 40, 60), 0.5, 500, 500) == (75, 85, 90, 90)  # side 1.5 * 60, same centre
    assert square_box((0, 10, 40, 40), 0.5, 500, 500) == (0, 0, 50, 60)  # clipped at the left and top
    assert square_box((480, 480, 40, 40), 0.0, 500, 500) == (480, 480, 20, 20)  # and at the right and bottom


# ---------------------------------------------------------------------------------------------- detection


def test_haar_finds_the_astronaut_and_no_face_on_the_cat(astronaut):
    detector = HaarFaceDetector()
    found = detector(astronaut)
    assert [d.box for d in found] == [ASTRONAUT_FACE] and found[0].score > 0
    assert detector(skdata.chelsea()) == []


# ---------------------------------------------------------------------------------------------- recognizer


def test_single_face_crop_with_the_none_detector(ckpts, face_crop):
    rec = ExpressionRecognizer(str(ckpts["acsinet18"]), detector="none")
    result = rec(face_crop)
    assert len(result) == 1 and result.skipped == []
    face = result[0]
    h, w = face_crop.shape[:2]
    assert face.box == (0, 0, w, h) and face.detection_score == 1.0
    assert face.label_names == FER7_LABELS and list(face.probabilities) == list(FER7_LABELS)
    probs = np.array(list(face.probabilities.values()))
    expected = _reference_probs(ckpts["acsinet18"], face_crop[: min(h, w), : min(h, w)])  # square crop, margin 0.2
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert face.label == FER7_LABELS[int(expected.argmax())] and face.score == pytest.approx(expected.max())


def test_flip_tta_averages_the_face_and_its_mirror(ckpts, face_crop):
    """tta_flip: each face's probabilities are the mean of its own and its mirror image's; the attention map is
    drawn for the averaged prediction."""
    plain = ExpressionRecognizer(str(ckpts["acsinet18"]), detector="none")
    tta = ExpressionRecognizer(str(ckpts["acsinet18"]), detector="none", tta_flip=True)
    mirror = np.ascontiguousarray(face_crop[:, ::-1])

    def probabilities(face):
        return np.array(list(face.probabilities.values()))

    one_view = probabilities(plain(face_crop)[0])
    expected = (one_view + probabilities(plain(mirror)[0])) / 2
    face = tta(face_crop, attention="cam")[0]
    np.testing.assert_allclose(probabilities(face), expected, atol=1e-6)
    assert face.label == FER7_LABELS[int(expected.argmax())] and face.attention.label == face.label
    assert not np.allclose(expected, one_view, atol=1e-3)  # the mirror image changes the answer


def test_the_default_model_is_the_shipped_acsinet18(astronaut):
    """With no model named, the recognizer runs the FER-2013 ACSI-Net-18 weights that ship with the package."""
    default, named = ExpressionRecognizer(), ExpressionRecognizer("acsinet18.fer2013")
    assert default.backend.source == "acsinet18.fer2013" and default.backend.grayscale
    faces, expected = default(astronaut), named(astronaut)
    assert [f.box for f in faces] == [f.box for f in expected] == [(177, 67, 93, 93)]
    assert faces[0].probabilities == expected[0].probabilities
    assert faces[0].label == "happiness" and faces[0].score == pytest.approx(0.885, abs=0.005)


def test_detected_face_is_classified_on_its_margin_crop(rec, ckpts, astronaut, face_crop):
    result = rec(astronaut)
    assert (result.width, result.height) == (512, 512)
    face = result[0]
    assert face.box == ASTRONAUT_FACE and face.crop_box == square_box(ASTRONAUT_FACE, 0.2, 512, 512)
    np.testing.assert_allclose(
        list(face.probabilities.values()), _reference_probs(ckpts["acsinet18"], face_crop), atol=1e-5
    )
    assert len(rec(skdata.chelsea())) == 0


@pytest.fixture(scope="module")
def group_photo(astronaut):
    """Three faces on one canvas: the astronaut's face with context, its mirror image and a smaller copy."""
    x, y, w, h = square_box(ASTRONAUT_FACE, 0.5, 512, 512)
    face = astronaut[y : y + h, x : x + w]
    faces = [face, face[:, ::-1], np.asarray(Image.fromarray(face).resize((w * 4 // 5, h * 4 // 5)))]
    canvas = np.full((h + 60, 3 * 190, 3), 128, dtype=np.uint8)
    for i, f in enumerate(faces):
        canvas[30 : 30 + f.shape[0], 20 + 190 * i : 20 + 190 * i + f.shape[1]] = f
    return canvas


def test_several_faces_in_one_image_are_batched_and_each_equals_its_own_crop(rec, group_photo):
    canvas = group_photo
    result = rec(canvas)
    assert len(result) == 3
    assert [f.box[0] // 190 for f in result] == [0, 1, 2]  # numbered left to right
    for face in result:
        x, y, w, h = face.crop_box
        alone = rec(canvas[y : y + h, x : x + w], boxes=[(0, 0, w, h)])[0]
        np.testing.assert_allclose(list(face.probabilities.values()), list(alone.probabilities.values()), atol=1e-5)


def test_batch_size_and_channels_last_do_not_change_results(ckpts, group_photo):
    canvas = group_photo
    one = ExpressionRecognizer(str(ckpts["acsinet18"]), batch_size=1)(canvas)
    big = ExpressionRecognizer(str(ckpts["acsinet18"]), batch_size=64, channels_last=True)(canvas)
    assert len(one) == len(big) == 3 and [f.box for f in one] == [f.box for f in big]
    for a, b in zip(one, big):
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5)


def test_given_boxes_replace_detection_and_small_faces_are_skipped(rec, astronaut):
    result = rec(astronaut, boxes=[(10, 10, 100, 120), (300, 300, 10, 10)])
    assert [f.box for f in result] == [(10, 10, 100, 120)] and result[0].detection_score is None
    assert result[0].crop_box == (0, 0, 132, 142)  # 1.2 * 120 = 144 wide around (60, 70), clipped at 0
    assert result.skipped == [Detection((300, 300, 10, 10), None)]
    with pytest.raises(ValueError, match="width, height > 0"):
        rec(astronaut, boxes=[(0, 0, 0, 10)])


def test_grayscale_model_sees_colour_and_gray_alike(ckpts, face_crop):
    gray = np.asarray(Image.fromarray(face_crop).convert("L").convert("RGB"))
    rec = ExpressionRecognizer(str(ckpts["gray"]), detector="none")
    colour_probs = list(rec(face_crop)[0].probabilities.values())
    assert colour_probs == list(rec(gray)[0].probabilities.values())
    expected = _reference_probs(ckpts["gray"], face_crop[:111, :111], grayscale=True)
    np.testing.assert_allclose(colour_probs, expected, atol=1e-5)


def test_inputs_paths_pil_and_gray_arrays(rec, tmp_path, astronaut):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    by_path = rec(str(path))
    assert by_path.source == str(path) and by_path[0].box == ASTRONAUT_FACE
    assert rec(Image.fromarray(astronaut))[0].probabilities == by_path[0].probabilities
    gray = astronaut[:, :, 0]
    by_gray = rec(gray, boxes=[ASTRONAUT_FACE])[0]
    assert by_gray.box == ASTRONAUT_FACE
    assert by_gray.probabilities == rec(np.repeat(gray[:, :, None], 3, axis=2), boxes=[ASTRONAUT_FACE])[0].probabilities
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UnreadableImageError, match="bad.png is not a readable image"):
        load_image(tmp_path / "bad.png")


def test_pil_images_are_read_as_their_files_are(rec, tmp_path, astronaut):
    """EXIF orientation and 16-bit/float pixels: a PIL image gives the pixels of the same picture read from a file."""
    upright = astronaut[:400]  # not square, so a missed rotation shows in the shape
    rotated = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation: stored turned 90 degrees clockwise; readers turn it back
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=-1))).save(rotated, exif=exif, quality=95)
    with Image.open(rotated) as img:
        pixels = to_rgb_array(img)
    np.testing.assert_array_equal(pixels, load_image(rotated))
    assert pixels.shape == upright.shape and np.abs(pixels.astype(int) - upright).mean() < 3  # JPEG noise only
    deep = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert to_rgb_array(img)[0, :, 0].tolist() == [0, 1, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F" and to_rgb_array(floats)[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match=r"got uint16: scale them to 0..255 first, e.g. \(a >> 8\)"):
        to_rgb_array(deep)


def test_boxes_outside_the_image_are_refused(rec, astronaut):
    h, w = astronaut.shape[:2]
    for box in ([w, 0, 50, 50], [0, h + 5, 50, 50], [-60, 10, 50, 50]):
        with pytest.raises(ValueError, match=rf"Face box \[.*\] .* lies outside the {w}x{h} image"):
            rec(astronaut, boxes=[box])
    assert rec(astronaut, boxes=[[-10, -10, 60, 60]])[0].crop_box[:2] == (0, 0)  # overlapping: clipped, kept


class NumpyBackend:
    """The backend protocol without torch: mean colour of each channel, 7 logits (stand-in for OnnxBackend)."""

    label_names = FER7_LABELS
    data_config = CONFIGS["bilinear"]
    grayscale = False
    source = "numpy"

    def __call__(self, batch):
        means = batch.mean(axis=(2, 3))
        return np.concatenate([means, -means, means[:, :1]], axis=1).astype(np.float32)


def test_any_backend_object_works_and_attention_needs_torch(face_crop):
    rec = ExpressionRecognizer(NumpyBackend(), detector="none")
    face = rec(face_crop)[0]
    batch = Preprocessor(CONFIGS["bilinear"])([face_crop[:111, :111]])
    logits = NumpyBackend()(batch)[0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(list(face.probabilities.values()), expected, atol=1e-6)
    with pytest.raises(ValueError, match="Attention maps need the torch backend"):
        rec(face_crop, attention="cam")


# ---------------------------------------------------------------------------------------------- attention


@pytest.fixture(scope="module")
def resnet(ckpts):
    return load_model(str(ckpts["resnet18"])).model


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def test_cam_is_the_classifier_weighted_final_feature_map(resnet, batch):
    logits, classes, cams = class_activation_maps(resnet, batch)
    with torch.no_grad():
        features = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.act1(
            resnet.bn1(resnet.conv1(batch))))))))  # fmt: skip
        expected_logits = resnet(batch)
    weight, bias = resnet.fc.weight, resnet.fc.bias
    assert torch.equal(classes, expected_logits.argmax(-1))
    for n, k in enumerate(classes.tolist()):
        manual = sum(weight[k, c] * features[n, c] for c in range(features.shape[1]))
        torch.testing.assert_close(cams[n], manual, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cams[n].mean() + bias[k], expected_logits[n, k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits)
    chosen = class_activation_maps(resnet, batch, class_index=[6, 6, 6])[1]
    assert chosen.tolist() == [6, 6, 6]


def test_grad_cam_on_the_last_block_is_cam_up_to_scale(resnet, batch):
    _, classes, cams = class_activation_maps(resnet, batch)
    _, g_classes, gradcams = grad_cam(resnet, batch, "layer4")
    assert torch.equal(classes, g_classes)
    h, w = cams.shape[1:]
    torch.testing.assert_close(gradcams, torch.relu(cams) / (h * w), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="No layer 'layer9'"):
        grad_cam(resnet, batch, "layer9")


def test_recognizer_attention_maps(ckpts, astronaut):
    rec = ExpressionRecognizer(str(ckpts["resnet18"]))
    face = rec(astronaut, attention="cam")[0]
    att = face.attention
    assert att.method == "cam" and att.label == face.label and att.raw.shape == (2, 2)
    x, y, w, h = att.region  # the part of the crop the network saw: the centre 64/72 of it
    cx, cy, cw, ch = face.crop_box
    assert (w, h) == (round(cw * 64 / 72), round(ch * 64 / 72)) and x >= cx and y >= cy
    assert att.heatmap.shape == (h, w) and att.heatmap.min() >= 0 and att.heatmap.max() == pytest.approx(1.0)
    assert att.overlay.shape == (h, w, 3) and att.overlay.dtype == np.uint8
    forced = rec(astronaut, attention="gradcam", attention_layer="layer4", attention_class="fear")[0].attention
    assert forced.label == "fear" and forced.method == "gradcam"
    with pytest.raises(ValueError, match="No class 'joy'"):
        rec(astronaut, attention="cam", attention_class="joy")
    with pytest.raises(ValueError, match="Grad-CAM needs a layer name"):
        rec(astronaut, attention="gradcam")


def test_jet_colormap_and_annotation(rec, astronaut):
    assert jet(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    picture = annotate(astronaut, rec(astronaut))
    assert picture.size == (512, 512)
    x, y, w, h = ASTRONAUT_FACE
    assert picture.getpixel((x, y + h // 2)) == (255, 196, 0)  # the box's left edge


# -------------------------------------------------------------------------------------------------- video


def _write_video(path, frames):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (frames[0].shape[1], frames[0].shape[0]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_frames_every_n(tmp_path, astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((128, 128)))
    frames = [np.roll(small, 8 * i, axis=1) for i in range(7)]
    _write_video(tmp_path / "v.avi", frames)
    read = list(read_frames(tmp_path / "v.avi", every=3))
    assert [i for i, _ in read] == [0, 3, 6]
    for i, frame in read:  # MJPG is lossy: close, not equal
        assert frame.shape == (128, 128, 3) and np.abs(frame.astype(int) - frames[i]).mean() < 8
    (tmp_path / "bad.avi").write_bytes(b"RIFF not a video")
    with pytest.raises(UnreadableVideoError, match="bad.avi cannot be opened as a video"):
        list(read_frames(tmp_path / "bad.avi"))


# ------------------------------------------------------------------------------------------ imports

TORCH_FREE = """
import sys
for name in ("torch", "timm", "torchvision"):
    sys.modules[name] = None  # any import of them now fails
import numpy as np
import timm_acsi
from timm_acsi.cli import predict
from timm_acsi.inference import ExpressionRecognizer

class Backend:
    label_names = timm_acsi.FER7_LABELS
    data_config = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    grayscale, source = True, "numpy"
    def __call__(self, batch):
        return np.repeat(batch.mean(axis=(1, 2, 3))[:, None], 7, axis=1) * np.arange(7, dtype=np.float32)

face = ExpressionRecognizer(Backend(), detector="none")(np.full((40, 40, 3), 255, np.uint8))[0]
print(timm_acsi.HAS_TORCH, face.label, round(face.score, 4))
"""


def test_detection_preprocessing_and_recognizer_run_without_torch():
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "neutral", "0.6327"]  # logits 0..6 (white = 1.0): softmax max


def test_import_timm_acsi_does_not_load_the_predictor():
    script = (
        "import sys, timm_acsi; assert 'timm_acsi.inference' not in sys.modules; "
        "cls = timm_acsi.ExpressionRecognizer; print(cls.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "timm_acsi.inference.recognizer", proc.stderr[-3000:]
