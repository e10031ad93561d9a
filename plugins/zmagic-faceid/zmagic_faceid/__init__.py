"""zmagic-faceid: a face-identity energy (ArcFace IR-SE50 or facenet) for zmagic guidance.

Public for other plugins (zmagic-landmark crops its faces with them; import them from here,
``from zmagic_faceid import ...``, not from the submodules): the face box on a reference and the
differentiable crop, ``Box``, :func:`detect_face`, :func:`square_box`, :func:`check_box`,
:func:`box_problem` and :func:`crop_resize`.
"""
from .energy import FaceIDEnergy, FaceIDOptions, build_faceid
from .faces import Box, box_problem, check_box, crop_resize, detect_face, fraction_box, square_box
from .irse import IRSEBackbone, ir_se50

__all__ = ["FaceIDEnergy", "FaceIDOptions", "build_faceid", "IRSEBackbone", "ir_se50",
           # public for other plugins
           "Box", "box_problem", "check_box", "crop_resize", "detect_face", "fraction_box", "square_box"]
__version__ = "0.1.0"
