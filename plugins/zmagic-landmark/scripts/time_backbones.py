"""Forward + backward (w.r.t. the input) time of the landmark backbones at their real input size,
random weights (O-Net: the real shipped weights), on the CPU:
``python scripts/time_backbones.py [batch] [repeats] [threads]``.

On a shared machine, 1 thread gives steadier numbers: with 2 OpenMP threads and other jobs
running, a descheduled thread stalls every operator (O-Net: 3 ms alone, 700 ms contended)."""
import os
import sys
from pathlib import Path

import torch

from zmagic_landmark.networks import ONetLandmarks, soft_argmax
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # the checkout's developer helpers
from timing import forward_backward as timed  # noqa: E402


def main():
    from face_alignment.models.fan import FAN

    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    fan = FAN(4).eval().requires_grad_(False)
    onet = ONetLandmarks().eval()
    for name, fn, size in [("MTCNN O-Net (5 points)", onet, 48),
                           ("face-alignment 2DFAN-4 + soft-argmax (68 points)",
                            lambda x: soft_argmax(fan((x + 1) / 2)[-1], 0.05), 256)]:
        best, median = timed(fn, size, batch, repeats)
        print(f"{name} at {size} px, batch {batch}: forward+backward best {best * 1e3:.0f} ms, "
              f"median {median * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
