"""samkit: Segment Anything — model, predictor, segment-everything, training, evaluation."""

from samkit.automatic import AutomaticMaskGenerator, SamAutomaticMaskGenerator
from samkit.build import MODEL_CONFIGS, build_sam, is_trained, sam_model_registry
from samkit.errors import SamkitError
from samkit.predictor import SamPredictor

__all__ = [
    "AutomaticMaskGenerator",
    "MODEL_CONFIGS",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "SamkitError",
    "build_sam",
    "is_trained",
    "sam_model_registry",
]
__version__ = "0.1.0"
