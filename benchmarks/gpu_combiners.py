"""Seconds per guided step and peak memory of every combiner on the real architectures, on a GPU.

    python benchmarks/gpu_combiners.py                          # CUDA: everything, real sizes, fp32/fp16/bf16
    python benchmarks/gpu_combiners.py --dtypes float16 --arch sd --steps 4
    python benchmarks/gpu_combiners.py --device cpu --tiny      # smoke test: tiny models, seconds on a CPU

Architectures (random weights, built by the configs in benchmarks/real_architectures.py): the
CelebA-HQ 256 DDPM UNet (google/ddpm-ema-celebahq-256's UNet2DModel config) at 256 px, and Stable
Diffusion v1.4's UNet + VAE at 512 px (64x64 latents; random 77x768 text embeddings stand in for
CLIP; the prompt is the first condition, as in the paper's text + style setting).  Conditions:
a Gram-matrix "style" energy of a random filter bank and a mean-colour energy (and, for n = 3 on the
pixel model, a second Gram energy), adaptive step rule.

Cases, per architecture and dtype: sum (n = 2, 3), dependent with the forward-difference product
(the default) and with the exact double-backward product (the paper's update), cagrad (c = 0.5,
defaults: difference products) for n = 2 and 3, and cagrad with exact products for n = 2.  Each
case runs in a fresh subprocess: the first `--steps` steps of a 100-step DDPM schedule, batch 1;
time per step is the mean over the steps after the first (CUDA synchronised), memory is
``torch.cuda.max_memory_allocated`` over the whole run (CPU: growth of the peak resident set).
A case that runs out of memory is reported as such.  The table gives ratios to sum with the same n,
architecture and dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from real_architectures import CELEBAHQ_UNET, SD14_UNET, SD14_VAE  # noqa: E402

# (label, combiner factory arguments, n)
CASES = [
    ("sum", {"kind": "sum"}, 2),
    ("dependent", {"kind": "dependent"}, 2),
    ("dependent-exact", {"kind": "dependent", "product": "autograd", "bound": "none", "project": "none"}, 2),
    ("cagrad", {"kind": "cagrad", "c": 0.5}, 2),
    ("cagrad-exact", {"kind": "cagrad", "c": 0.5, "product": "autograd", "bound": "none", "project": "none", "rescale": "none"}, 2),
    ("sum", {"kind": "sum"}, 3),
    ("cagrad", {"kind": "cagrad", "c": 0.5}, 3),
]
ARCHS = ("pixel", "sd")
DTYPES = ("float32", "float16", "bfloat16")

TINY_PIXEL = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
TINY_SD_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4)
TINY_SD_VAE = dict(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                   norm_num_groups=4)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def energies(size: int, device):
    import torch

    class Gram(torch.nn.Module):
        def __init__(self, seed: int):
            super().__init__()
            gen = torch.Generator().manual_seed(seed)
            self.register_buffer("w", torch.randn(8, 3, 3, 3, generator=gen) / 3)
            self.register_buffer("target", self.gram(torch.rand(1, 3, size, size, generator=gen) * 2 - 1))

        def gram(self, x):
            f = torch.tanh(torch.nn.functional.conv2d(x, self.w.to(x.dtype), padding=1)).flatten(2)
            return f @ f.transpose(1, 2) / f.shape[-1]

        def forward(self, x):
            return (self.gram(x) - self.target.to(x.dtype)).flatten(1).norm(dim=1)

    class Color(torch.nn.Module):
        def forward(self, x):
            return (x.mean(dim=(2, 3)) - torch.tensor([0.5, -0.2, 0.1], device=x.device, dtype=x.dtype)).norm(dim=1)

    return Gram(0).to(device), Color().to(device), Gram(1).to(device)


def build(arch: str, args, dtype, device):
    """(model, conditions of the recipe) for an architecture at its size (or tiny)."""
    import torch

    from zmagic_core.method.guidance import Condition
    from zmagic_core.method.schedule import linear_alphas_cumprod

    torch.manual_seed(0)
    if arch == "pixel":
        from diffusers import UNet2DModel

        from zmagic_core.models.pretrained.pixel import DiffusersPixelModel

        size = 16 if args.tiny else args.pixel_size
        config = dict(TINY_PIXEL if args.tiny else CELEBAHQ_UNET, sample_size=size)
        unet = UNet2DModel(**config).to(device, dtype)
        model = DiffusersPixelModel(unet, linear_alphas_cumprod(), sample_size=size).to(device)
        gram, color, gram2 = energies(size, device)
        conds = [Condition("style", gram, "adaptive", 0.5), Condition("color", color, "adaptive", 0.5),
                 Condition("style2", gram2, "adaptive", 0.5)]
        return model, conds, f"{size} px"
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from zmagic_core.method.predictions import alphas_cumprod_from_config
    from zmagic_core.models.pretrained.stable_diffusion import StableDiffusionModel

    size = 32 if args.tiny else args.sd_size
    unet = UNet2DConditionModel(**(TINY_SD_UNET if args.tiny else SD14_UNET)).to(device, dtype)
    vae = AutoencoderKL(**(TINY_SD_VAE if args.tiny else SD14_VAE)).to(device, dtype)
    width = 16 if args.tiny else 768
    gen = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, width, generator=gen).to(device, dtype) for _ in range(2))
    abar = alphas_cumprod_from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    model = StableDiffusionModel(unet, vae, cond, uncond, abar, 7.5, size, size).to(device)
    gram, color, _ = energies(size, device)
    # the prompt (a model condition) is c1; n = 2: prompt + style, n = 3: + colour
    conds = [Condition("style", gram, "adaptive", 0.2), Condition("color", color, "adaptive", 0.2)]
    return model, conds, f"{size} px, latents {model.sample_shape[1]}x{model.sample_shape[2]}"


def make_combiner(spec: dict):
    from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner

    spec = dict(spec)
    kind = spec.pop("kind")
    return {"sum": SumCombiner, "dependent": DependentCombiner, "cagrad": CAGradCombiner}[kind](**spec)


def run_case(args) -> dict:
    import torch

    from zmagic_core.method.solvers import DDPMSolver
    from zmagic_core.sampling.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    label, spec, n = CASES[args.case]
    model, conds, shape = build(args.arch, args, dtype, device)
    recipe_conditions = conds[:n - len(model.model_conditions())]
    pipe = Pipeline(model, DDPMSolver(), make_combiner(spec), recipe_conditions, steps=100)
    pipe.schedule.timesteps = pipe.schedule.timesteps[:args.steps]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_rss = rss_mb()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    stamps = [time.perf_counter()]

    def callback(_):
        sync()
        stamps.append(time.perf_counter())

    result = pipe.run([0], batch_size=1, progress=False, callback=callback)
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    later = per_step[1:] or per_step
    out = {"arch": args.arch, "shape": shape, "dtype": args.dtype, "device": str(device), "case": label, "n": n,
           "s_per_step": sum(later) / len(later), "first_step_s": per_step[0],
           "finite": bool(torch.isfinite(result.samples).all()), "errors": len(result.errors)}
    if device.type == "cuda":
        out["peak_MB"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        out["peak_total_MB"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_MB"] = rss_mb() - base_rss
    if result.errors:
        out["error"] = next(iter(result.errors.values()))
    return out


def spawn(args, arch: str, dtype: str, case: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--arch", arch, "--dtypes", dtype, "--case", str(case),
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads),
           "--pixel-size", str(args.pixel_size), "--sd-size", str(args.sd_size)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        label, _, n = CASES[case]
        return {"arch": arch, "dtype": dtype, "case": label, "n": n,
                "error": "out of memory" if "out of memory" in proc.stderr.lower() else err}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = ("| arch | dtype | case | n | s/step | time / sum | peak MB | peak / sum | note |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ref = next((x for x in rows if x["arch"] == r["arch"] and x["dtype"] == r["dtype"] and x["case"] == "sum"
                    and x["n"] == r["n"] and "error" not in x), None)
        if "s_per_step" not in r:
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['case']} | {r['n']} | - | - | - | - | {r.get('error')} |")
            continue
        t = f"{r['s_per_step'] / ref['s_per_step']:.2f}" if ref else "-"
        m = f"{r['peak_MB'] / ref['peak_MB']:.2f}" if ref and ref["peak_MB"] > 1 else "-"
        note = r.get("error") or ("" if r.get("finite", True) else "non-finite sample")
        lines.append(f"| {r['arch']} ({r.get('shape', '')}) | {r['dtype']} | {r['case']} | {r['n']} | "
                     f"{r['s_per_step']:.3f} | {t} | {r['peak_MB']:.0f} | {m} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", nargs="*", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--dtypes", nargs="*", default=None, choices=DTYPES,
                   help="default: float32 float16 bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--steps", type=int, default=4, help="guided steps (the first is warm-up)")
    p.add_argument("--pixel-size", type=int, default=256)
    p.add_argument("--sd-size", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="tiny models at tiny sizes: a smoke test that runs on a CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = list(DTYPES) if args.device.startswith("cuda") else ["float32"]
    if args.child:
        args.dtype = args.dtypes[0]
        args.arch = args.arch[0]
        print(json.dumps(run_case(args)))
        return 0
    rows = []
    for arch in args.arch:
        for dtype in args.dtypes:
            for case in range(len(CASES)):
                row = spawn(args, arch, dtype, case)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
