"""Face parsing energy for zmagic: BiSeNet (CelebAMask-HQ, 19 classes) or SegFormer."""
from .bisenet import CLASS_NAMES, NUM_CLASSES, BiSeNet, load_bisenet
from .energy import ParsingEnergy, ParsingOptions, build_parsing

__all__ = ["BiSeNet", "CLASS_NAMES", "NUM_CLASSES", "ParsingEnergy", "ParsingOptions", "build_parsing",
           "load_bisenet"]
__version__ = "0.1.0"
