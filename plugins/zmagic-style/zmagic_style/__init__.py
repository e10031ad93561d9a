"""Gram-matrix style guidance for zmagic: the ``style`` energy (CLIP ViT block-2 tokens or VGG19)."""
from .backbones import GATYS_LAYERS, ClipTokens, VggFeatures, vgg19_features, vgg19_layer_names
from .energy import StyleEnergy, StyleOptions, build_style, gram_matrix

__version__ = "0.1.0"
__all__ = ["GATYS_LAYERS", "ClipTokens", "VggFeatures", "vgg19_features", "vgg19_layer_names", "StyleEnergy",
           "StyleOptions", "build_style", "gram_matrix"]
