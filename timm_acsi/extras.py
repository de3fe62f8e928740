"""Optional dependencies: imported where a job needs them, with an error that names the extra installing them."""

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "import_extra"]


class MissingExtraError(ImportError):
    """An optional dependency of a job is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f'{purpose} needs {module}, which is not installed: pip install "timm-acsi[{extra}]"', name=module
        )


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``module``, or :class:`MissingExtraError` naming ``pip install "timm-acsi[EXTRA]"`` when it cannot be imported
    (commands check their optional dependencies before any work, so the fix comes first and alone)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(module, extra, purpose) from e
