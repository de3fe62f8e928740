"""Expression recognition on photos, folders and video: face detection, crops, preprocessing, prediction,
attention maps and pictures. Nothing here imports torch until a torch model is loaded, so the onnxruntime
backend runs without it."""

from .detect import DETECTORS, Detection, FaceDetector, HaarFaceDetector, WholeImageDetector, create_detector
from .draw import annotate, blend_heatmap, jet
from .preprocess import Preprocessor, UnreadableImageError, load_image, square_box, to_rgb_array
from .recognizer import DEFAULT_MODEL, ExpressionRecognizer, softmax
from .results import AttentionMap, FaceResult, ImageResult
from .video import VIDEO_SUFFIXES, UnreadableVideoError, read_frames

__all__ = [
    "DETECTORS",
    "Detection",
    "FaceDetector",
    "HaarFaceDetector",
    "WholeImageDetector",
    "create_detector",
    "annotate",
    "blend_heatmap",
    "jet",
    "Preprocessor",
    "UnreadableImageError",
    "load_image",
    "square_box",
    "to_rgb_array",
    "DEFAULT_MODEL",
    "ExpressionRecognizer",
    "softmax",
    "AttentionMap",
    "FaceResult",
    "ImageResult",
    "VIDEO_SUFFIXES",
    "UnreadableVideoError",
    "read_frames",
]
