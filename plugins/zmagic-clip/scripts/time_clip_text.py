"""CPU time of the clip-text energy, forward and forward+backward w.r.t. the images.

ViT-B-16 (QuickGELU, as the OpenAI weights) with random weights: the real architecture and
input size (224) without needing the download.  Usage: python time_clip_text.py [--repeats 5] [--threads 1]
"""
import sys
from pathlib import Path
import os

import torch

from zmagic_clip import OPENAI_MEAN, OPENAI_STD, ClipTextEnergy, LoadedClip
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # the checkout's developer helpers
from timing import best_of, gflops  # noqa: E402


def main(repeats: int = 5):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval().requires_grad_(False)
    loaded = LoadedClip(model, "ViT-B-16", 224, OPENAI_MEAN, OPENAI_STD, "random")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for attention in ("math", "auto"):  # math: twice differentiable (the default)
        energy = ClipTextEnergy.from_clip(loaded, "a photo of a cat", "cosine", attention)
        for batch, size in ((1, 224), (4, 224), (1, 512)):
            x = torch.rand(batch, 3, size, size) * 2 - 1

            def fwd():
                with torch.no_grad():
                    energy(x)

            def fwd_bwd():
                xg = x.clone().requires_grad_(True)
                energy(xg).sum().backward()  # only the input requires grad

            def double():  # the dependent combiner's Hessian term: d/dx |grad E|^2
                xg = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(energy(xg).sum(), xg, create_graph=True)
                g.pow(2).sum().backward()

            if attention == "math" and batch == 1 and size == 224:
                dw, dc = best_of(double, repeats)
                print(f"clip-text ViT-B-16 attention=math batch 1 input 224px: double backward wall "
                      f"{dw * 1e3:6.0f} ms cpu {dc * 1e3:6.0f} ms")
            fw, fc = best_of(fwd, repeats)
            bw, bc = best_of(fwd_bwd, repeats)
            print(f"clip-text ViT-B-16 attention={attention:4s} batch {batch} input {size}px: "
                  f"forward wall {fw * 1e3:6.0f} ms cpu {fc * 1e3:6.0f} ms | forward+backward wall "
                  f"{bw * 1e3:6.0f} ms cpu {bc * 1e3:6.0f} ms | {gflops(fwd_bwd):.1f} GFLOP")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main(args.repeats)
