"""CPU time of the style energy, forward and forward+backward w.r.t. the images.

Real architectures with random weights: CLIP ViT-B-16 tokens after block 2 (input 224) and
VGG19 relu1_1..relu5_1 (input 224 and 256).  Usage: python time_style.py [repeats]
"""
import os
import sys
import time

import torch

from zmagic_style import ClipTokens, StyleEnergy, VggFeatures, vgg19_features
from zmagic_style.openclip_loading import OPENAI_MEAN, OPENAI_STD, LoadedClip


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sorted(times)[len(times) // 2]


def report(label, energy, batch, size, repeats):
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def fwd():
        with torch.no_grad():
            energy(x)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(energy(xg).sum(), xg)

    f, fm = best_of(fwd, repeats)
    b, bm = best_of(fwd_bwd, repeats)
    print(f"style {label} batch {batch} input {size}px: forward {f * 1e3:7.0f} ms (median {fm * 1e3:.0f}), "
          f"forward+backward {b * 1e3:7.0f} ms (median {bm * 1e3:.0f})")


def main(repeats: int = 5):
    import open_clip

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval().requires_grad_(False)
    loaded = LoadedClip(model, "ViT-B-16", 224, OPENAI_MEAN, OPENAI_STD, "random")
    ref = torch.rand(3, 512, 512) * 2 - 1
    clip = StyleEnergy(ClipTokens(loaded, block=2, attention="math"), ref, "sum")
    for batch, size in ((1, 224), (4, 224), (1, 512)):
        report("clip ViT-B-16 block 2 (math attention)", clip, batch, size, repeats)
    state = vgg19_features(29).state_dict()
    for image_size in (224, 256):
        vgg = StyleEnergy(VggFeatures(state, image_size=image_size), ref, "mean")
        for batch in (1, 4):
            report(f"vgg19 relu1_1..relu5_1 at {image_size}", vgg, batch, image_size, repeats)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
