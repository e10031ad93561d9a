"""Forward + backward (w.r.t. the input) time of the face-ID backbones at their real input size,
random weights, on the CPU: ``python scripts/time_backbones.py [batch] [repeats] [threads]``.

On a shared machine, 1 thread gives steadier numbers: with 2 OpenMP threads and other jobs
running, a descheduled thread stalls every operator (O-Net: 3 ms alone, 700 ms contended)."""
import os
import sys
from pathlib import Path

import torch

from zmagic_faceid.irse import ir_se50
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # the checkout's developer helpers
from timing import forward_backward as timed  # noqa: E402


def main():
    from facenet_pytorch import InceptionResnetV1

    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    for name, net, size in [("ArcFace IR-SE50", ir_se50(), 112),
                            ("facenet InceptionResnetV1", InceptionResnetV1(pretrained=None), 160)]:
        net = net.eval().requires_grad_(False)
        best, median = timed(net, size, batch, repeats)
        print(f"{name} at {size} px, batch {batch}: forward+backward best {best * 1e3:.0f} ms, "
              f"median {median * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
