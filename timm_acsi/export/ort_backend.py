"""Run an exported timm-acsi model with onnxruntime: numpy in, logits out, no torch anywhere on this path.

The file's metadata (:mod:`.metadata`) is read and checked first, so a model that was not exported by
timm-acsi, or whose graph changed after export, is refused before it can give wrong labels.
"""

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from .metadata import OnnxMetadata, load_onnx

__all__ = ["OnnxBackend"]

PathLike = Union[str, os.PathLike]
_ORT_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


class OnnxBackend:
    """An onnxruntime session of a ``timm-acsi export`` file and the facts to feed it.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers, best first (default: ``["CPUExecutionProvider"]``).
        threads: intra-op threads (default: onnxruntime's, one per physical core).

    Attributes:
        label_names: output ``i`` is ``label_names[i]``.
        data_config: the preprocessing, as timm's ``resolve_data_config`` gives it for the exported model.
        grayscale: faces must be converted to grayscale (replicated to 3 channels) before ``data_config``.
        source: the model source that was exported.
        metadata: everything the file says about itself (:class:`~timm_acsi.export.metadata.OnnxMetadata`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, one without (valid) timm-acsi metadata, one whose graph differs
            from the exported one, or one onnxruntime cannot run.
    """

    def __init__(self, path: PathLike, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None):
        data, model, self.metadata = load_onnx(path)
        self.path = str(path)
        self.label_names: Tuple[str, ...] = self.metadata.label_names
        self.data_config: Dict[str, Any] = self.metadata.data_config
        self.grayscale: bool = self.metadata.grayscale
        self.source: str = self.metadata.source
        self._session = self._create_session(data, providers, threads)
        self._input = self._session.get_inputs()[0]
        self._check_signature()

    def _create_session(
        self, data: bytes, providers: Optional[Sequence[str]], threads: Optional[int]
    ) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            return ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]))
        except _ORT_ERRORS as e:
            raise ValueError(f"onnxruntime cannot load {self.path}: {e}. Export the model again.") from e

    def _check_signature(self) -> None:
        """One NCHW input with the metadata's channels and one ``[N, num_classes]`` output, or raise."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        channels, n = self.metadata.input_size[0], len(self.label_names)
        shape = inputs[0].shape if len(inputs) == 1 else None
        out = outputs[0].shape if len(outputs) == 1 else None
        dtype = _ONNX_TYPES[self.metadata.dtype]
        if (
            shape is None
            or len(shape) != 4
            or shape[1] != channels
            or inputs[0].type != dtype
            or out is None
            or len(out) != 2
            or out[1] != n
        ):
            raise ValueError(
                f"{self.path}: graph inputs {[(i.shape, i.type) for i in inputs]} and outputs "
                f"{[o.shape for o in outputs]} do not match its metadata ({channels}-channel NCHW {dtype} images in, "
                f"{n} logits out): the file was edited. Export the model again."
            )

    @property
    def input_shape(self) -> Tuple[Union[int, str], ...]:
        """The graph's input shape; names (``"batch"``, ``"height"``...) mark the free axes."""
        return tuple(self._input.shape)

    @property
    def providers(self) -> Tuple[str, ...]:
        """The execution providers the session runs on."""
        return tuple(self._session.get_providers())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``float32 [N, num_classes]`` of a preprocessed ``float32 [N, C, H, W]`` batch.

        A graph exported with a fixed batch size (``export --batch-size B``) takes any ``N``: the batch runs in
        chunks of ``B``, the last one zero-padded (the padding's logits are dropped).

        Raises:
            ValueError: a batch of another rank, channel count, or (for a fixed-size export) height/width.
        """
        batch = np.asarray(batch)
        if batch.ndim != 4 or not all(_fits(axis, n) for axis, n in zip(self.input_shape[1:], batch.shape[1:])):
            raise ValueError(
                f"{self.path} takes batches of shape {list(self.input_shape)} (names are free axes), got "
                f"{list(batch.shape)}: preprocess the faces to its data_config first."
            )
        feed = batch.astype(_NUMPY_DTYPES[self.metadata.dtype], copy=False)
        fixed = self.input_shape[0]
        if not isinstance(fixed, int) or fixed == len(feed):
            return self._run(feed)
        chunks = [feed[i : i + fixed] for i in range(0, len(feed), fixed)]
        logits = [self._run(_pad(chunk, fixed))[: len(chunk)] for chunk in chunks]
        return np.concatenate(logits) if logits else np.zeros((0, len(self.label_names)), np.float32)

    def _run(self, feed: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run(None, {self._input.name: feed})
        return logits.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        m: OnnxMetadata = self.metadata
        return f"{type(self).__name__}({self.path!r}, {m.architecture}, {len(self.label_names)} classes, {m.dtype})"


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` zero-padded along its first axis to ``size``."""
    return (
        np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])
        if len(batch) < size
        else batch
    )


def _fits(axis: Union[int, str, None], n: int) -> bool:
    """A batch size ``n`` fits an input axis that is free (named or unknown) or fixed to ``n``."""
    return axis is None or isinstance(axis, str) or axis == n
