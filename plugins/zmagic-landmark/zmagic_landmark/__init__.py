"""zmagic-landmark: a facial-landmark energy (MTCNN O-Net 5 points, face-alignment FAN 68 points)."""
from .energy import LandmarkEnergy, LandmarkOptions, build_landmark
from .networks import FANLandmarks, ONetLandmarks, soft_argmax

__all__ = ["LandmarkEnergy", "LandmarkOptions", "build_landmark", "FANLandmarks", "ONetLandmarks", "soft_argmax"]
__version__ = "0.1.0"
