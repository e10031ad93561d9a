"""Independent evaluators for zmagic experiments (``zmagic eval``): dlib face ID and 68-point
landmarks with real weights, CLIP ViT-L/14 text, SegFormer/BiSeNet segmentation, VGG19 style."""
from .evaluators import (EVALUATORS, ClipLargeTextEvaluator, DlibIdEvaluator, DlibLandmarkEvaluator,
                         SegmentationEvaluator, VggStyleEvaluator)
from .faces import DlibFaces, DlibMissing, id_distance, landmark_distance

__version__ = "0.1.0"
__all__ = ["EVALUATORS", "ClipLargeTextEvaluator", "DlibIdEvaluator", "DlibLandmarkEvaluator", "SegmentationEvaluator",
           "VggStyleEvaluator", "DlibFaces", "DlibMissing", "id_distance", "landmark_distance"]
