"""CPU time of the clip-text energy, forward and forward+backward w.r.t. the images.

ViT-B-16 (QuickGELU, as the OpenAI weights) with random weights: the real architecture and
input size (224) without needing the download.  Usage: python time_clip_text.py [repeats]
"""
import os
import sys
import time

import torch

from zmagic_clip import ClipTextEnergy, LoadedClip
from zmagic_clip.loading import OPENAI_MEAN, OPENAI_STD


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sorted(times)[len(times) // 2]


def main(repeats: int = 5):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval().requires_grad_(False)
    loaded = LoadedClip(model, "ViT-B-16", 224, OPENAI_MEAN, OPENAI_STD, "random")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for attention in ("math", "auto"):
        energy = ClipTextEnergy.from_clip(loaded, "a photo of a cat", "cosine", attention)
        for batch, size in ((1, 224), (4, 224), (1, 512)):
            x = torch.rand(batch, 3, size, size) * 2 - 1

            def fwd():
                with torch.no_grad():
                    energy(x)

            def fwd_bwd():
                xg = x.clone().requires_grad_(True)
                torch.autograd.grad(energy(xg).sum(), xg)

            f, fm = best_of(fwd, repeats)
            b, bm = best_of(fwd_bwd, repeats)
            print(f"clip-text ViT-B-16 attention={attention:4s} batch {batch} input {size}px: "
                  f"forward {f * 1e3:7.0f} ms (median {fm * 1e3:.0f}), forward+backward {b * 1e3:7.0f} ms "
                  f"(median {bm * 1e3:.0f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
