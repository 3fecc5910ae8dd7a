"""samkit: Segment Anything — model, predictor, segment-everything, training, evaluation.

The public names load on first use (PEP 562), so ``import samkit`` and ``samkit --version``
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "AutomaticMaskGenerator": "samkit.automatic",
    "SamAutomaticMaskGenerator": "samkit.automatic",
    "MODEL_CONFIGS": "samkit.registry",
    "build_sam": "samkit.build",
    "is_trained": "samkit.build",
    "sam_model_registry": "samkit.build",
    "SamkitError": "samkit.errors",
    "SamPredictor": "samkit.predictor",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'samkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
