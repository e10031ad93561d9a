"""zmagic-faceid: a face-identity energy (ArcFace IR-SE50 or facenet) for zmagic guidance."""
from .energy import FaceIDEnergy, FaceIDOptions, build_faceid
from .irse import IRSEBackbone, ir_se50

__all__ = ["FaceIDEnergy", "FaceIDOptions", "build_faceid", "IRSEBackbone", "ir_se50"]
__version__ = "0.1.0"
