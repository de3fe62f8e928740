"""The PyTorch backend of the recognizer: a :class:`~timm_acsi.sources.LoadedModel` behind the same small
interface as ``timm_acsi.export.ort_backend.OnnxBackend`` (numpy batch in, numpy logits out), plus attention maps."""

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..sources import LoadedModel, load_model
from .cam import check_cam_applies, class_activation_maps, grad_cam

__all__ = ["TorchBackend"]


class TorchBackend:
    """Runs a loaded model under ``torch.inference_mode`` on its device.

    Args:
        loaded: the model and its description.
        channels_last: run the model in channels-last memory format.
        compile: run the logits through ``torch.compile(model)`` (inductor; on the CPU it needs a C compiler
            such as gcc). The first batch compiles (about 30 s for acsinet18 on a 2-core CPU), the first batch of
            another size once more, with a dynamic batch size that serves all later ones: for long runs only
            (folders, video). Attention maps use the plain model (their hooks and gradients need it).

    Attributes:
        label_names, data_config, grayscale, source: as :class:`~timm_acsi.sources.LoadedModel`.
    """

    def __init__(self, loaded: LoadedModel, channels_last: bool = False, compile: bool = False):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.label_names = loaded.label_names
        self.data_config = loaded.data_config
        self.grayscale = loaded.grayscale
        self.source = loaded.source
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.device = next(self.model.parameters()).device
        self._forward = torch.compile(self.model) if compile else self.model

    @classmethod
    def from_source(
        cls, source: str, device: str = "cpu", channels_last: bool = False, compile: bool = False, **load_kwargs
    ) -> "TorchBackend":
        """Load ``source`` with :func:`~timm_acsi.sources.load_model` (its kwargs pass through)."""
        return cls(load_model(source, device, **load_kwargs), channels_last=channels_last, compile=compile)

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW, already normalised -> logits float32 ``[N, num_classes]``."""
        with torch.inference_mode():
            return self._forward(self._tensor(batch)).float().cpu().numpy()

    def check_attention(self, method: str, layer: Optional[str] = None) -> None:
        """Raise now (before any image is read) if ``method`` cannot run on this model."""
        if method == "cam":
            check_cam_applies(self.model)
        elif method == "gradcam":
            if not layer:
                raise ValueError("Grad-CAM needs a layer name (e.g. layer4, the last block of a ResNet).")
            try:
                self.model.get_submodule(layer)
            except AttributeError as e:
                raise ValueError(f"No layer {layer!r} in {self.loaded.architecture}.") from e
        else:
            raise ValueError(f"Unknown attention method {method!r}: use 'cam' or 'gradcam'.")

    def attention(
        self,
        batch: np.ndarray,
        method: str = "cam",
        layer: Optional[str] = None,
        class_index: Optional[Sequence[int]] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits [N, K], classes [N], maps [N, h, w])`` for each sample's class (default: the predicted one)."""
        self.check_attention(method, layer)
        x = self._tensor(batch)
        if method == "cam":
            logits, classes, maps = class_activation_maps(self.model, x, class_index)
        else:
            logits, classes, maps = grad_cam(self.model, x, layer, class_index)
        return logits.float().cpu().numpy(), classes.cpu().numpy(), maps.float().cpu().numpy()
