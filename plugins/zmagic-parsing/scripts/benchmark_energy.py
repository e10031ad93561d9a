"""Time the parsing energy's forward + backward (gradient w.r.t. the input image) on the CPU.

Random BiSeNet weights (the cost does not depend on the values).  Example:
    python plugins/zmagic-parsing/scripts/benchmark_energy.py --input-size 512 --image-size 256 --batch 1
"""
import argparse
import statistics
import time

import torch

from zmagic_parsing.bisenet import BiSeNet
from zmagic_parsing.energy import BiSeNetParser, ParsingEnergy


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input-size", type=int, default=512, help="parsing resolution (the option input_size)")
    ap.add_argument("--image-size", type=int, default=256, help="side of the images the energy receives")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--double-backward", action="store_true", help="also differentiate the gradient")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = torch.rand(3, args.image_size, args.image_size) * 2 - 1
    energy = ParsingEnergy(BiSeNetParser(BiSeNet().eval()), ref, input_size=args.input_size)
    x0 = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1

    def once():
        x = x0.clone().requires_grad_(True)
        e = energy(x)
        (g,) = torch.autograd.grad(e.sum(), x, create_graph=args.double_backward)
        if args.double_backward:
            g.pow(2).sum().backward()
        return g

    once()  # warm-up (kernel selection, allocations)
    walls, cpus = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        once()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(f"parsing energy forward+backward{' (+double backward)' if args.double_backward else ''}: "
          f"batch {args.batch}, image {args.image_size} px -> parsed at {args.input_size} px, "
          f"{torch.get_num_threads()} threads")
    print(f"wall: median {statistics.median(walls):.3f} s, min {min(walls):.3f} s; "
          f"process CPU: median {statistics.median(cpus):.3f} s ({args.repeats} repeats)")


if __name__ == "__main__":
    main()
