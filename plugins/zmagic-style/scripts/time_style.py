"""CPU time of the style energy, forward and forward+backward w.r.t. the images.

Real architectures with random weights: CLIP ViT-B-16 tokens after block 2 (input 224) and
VGG19 relu1_1..relu5_1 (input 224 and 256).  Usage: python time_style.py [--repeats 5] [--threads 1]
"""
import sys
from pathlib import Path
import os

import torch

from zmagic_clip import OPENAI_MEAN, OPENAI_STD, LoadedClip
from zmagic_style import ClipTokens, StyleEnergy, VggFeatures, vgg19_features
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # the checkout's developer helpers
from timing import best_of, gflops  # noqa: E402


def report(label, energy, batch, size, repeats):
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def fwd():
        with torch.no_grad():
            energy(x)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        energy(xg).sum().backward()  # only the input requires grad

    fw, fc = best_of(fwd, repeats)
    bw, bc = best_of(fwd_bwd, repeats)
    print(f"style {label} batch {batch} input {size}px: forward wall {fw * 1e3:6.0f} ms cpu {fc * 1e3:6.0f} ms | "
          f"forward+backward wall {bw * 1e3:6.0f} ms cpu {bc * 1e3:6.0f} ms | {gflops(fwd_bwd):.1f} GFLOP")


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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.repeats)
