"""Seconds per guided step and peak memory of the real architectures, random-initialised.

    python benchmarks/real_architectures.py                     # all four cases, CPU
    python benchmarks/real_architectures.py --case pixel-sum --size 64 --steps 3

Cases: the CelebA-HQ 256 DDPM UNet (google/ddpm-ema-celebahq-256's UNet2DModel config) run at
``--size`` px with two conditions (a Gram "style" energy and a mean-colour energy), and Stable
Diffusion v1.4's UNet + VAE (CLIP text encoder replaced by random 77x768 embeddings) at
``--sd-size`` px with the prompt condition plus the Gram energy; each under ``sum`` and
``dependent`` (Hessian term on).  Every case runs in a fresh subprocess; memory is the peak
resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of that process, reported as the
part above the process after imports (weights + activations), and on CUDA
``torch.cuda.max_memory_allocated``.  Time per step is the mean over the steps after the first.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("pixel-sum", "pixel-dependent", "sd-sum", "sd-dependent")

CELEBAHQ_UNET = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)
SD14_UNET = dict(  # CompVis/stable-diffusion-v1-4 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD14_VAE = dict(  # CompVis/stable-diffusion-v1-4 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def energies(size: int):
    import torch

    class Gram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("w", torch.randn(8, 3, 3, 3, generator=gen) / 3)
            ref = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
            self.register_buffer("target", self.gram(ref))

        def gram(self, x):
            f = torch.tanh(torch.nn.functional.conv2d(x, self.w.to(x.dtype), padding=1)).flatten(2)
            return f @ f.transpose(1, 2) / f.shape[-1]

        def forward(self, x):
            return (self.gram(x) - self.target).flatten(1).norm(dim=1)

    class Color(torch.nn.Module):
        def forward(self, x):
            return (x.mean(dim=(2, 3)) - torch.tensor([0.5, -0.2, 0.1], device=x.device)).norm(dim=1)

    return Gram(), Color()


def run_case(case: str, args) -> dict:
    import torch

    from zmagic_core.method.combiners import DependentCombiner, SumCombiner
    from zmagic_core.method.guidance import Condition
    from zmagic_core.sampling.pipeline import Pipeline
    from zmagic_core.method.schedule import linear_alphas_cumprod
    from zmagic_core.method.solvers import DDPMSolver

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    base_rss = rss_mb()
    torch.manual_seed(0)
    kind, combiner_name = case.split("-")
    if kind == "pixel":
        from diffusers import UNet2DModel

        from zmagic_core.models.pretrained.pixel import DiffusersPixelModel

        unet = UNet2DModel(**CELEBAHQ_UNET).to(device, dtype)
        if args.checkpointing:
            from zmagic_core.models.pretrained.attention import checkpoint_function
            unet.enable_gradient_checkpointing(checkpoint_function)
        model = DiffusersPixelModel(unet, linear_alphas_cumprod(), sample_size=args.size).to(device)
        gram, color = energies(args.size)
        conds = [Condition("style", gram.to(device), "adaptive", 0.5), Condition("color", color, "adaptive", 0.5)]
        shape = f"{args.size}x{args.size} px"
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from zmagic_core.method.predictions import alphas_cumprod_from_config
        from zmagic_core.models.pretrained.stable_diffusion import StableDiffusionModel

        unet = UNet2DConditionModel(**SD14_UNET).to(device, dtype)
        vae = AutoencoderKL(**SD14_VAE).to(device, dtype)
        if args.checkpointing:
            from zmagic_core.models.pretrained.attention import checkpoint_function
            unet.enable_gradient_checkpointing(checkpoint_function)
            vae.enable_gradient_checkpointing(checkpoint_function)
        gen = torch.Generator().manual_seed(1)
        cond, uncond = (torch.randn(1, 77, 768, generator=gen).to(device, dtype) for _ in range(2))
        abar = alphas_cumprod_from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
        model = StableDiffusionModel(unet, vae, cond, uncond, abar, 7.5, args.sd_size, args.sd_size,
                                     decode_size=args.decode_size).to(device)
        gram, _ = energies(args.decode_size or args.sd_size)
        conds = [Condition("style", gram.to(device), "adaptive", 0.2)]
        shape = f"{args.sd_size}x{args.sd_size} px, latents {model.sample_shape[1]}x{model.sample_shape[2]}"
    params = sum(p.numel() for m in model.children() for p in m.parameters())
    weights_rss = rss_mb()
    combiner = SumCombiner() if combiner_name == "sum" else DependentCombiner(hessian=True)
    pipe = Pipeline(model, DDPMSolver(), combiner, conds, steps=100)
    pipe.schedule.timesteps = pipe.schedule.timesteps[:args.steps]  # the first `steps` of a 100-step run
    stamps = [time.perf_counter()]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pipe.run([0], batch_size=1, progress=False, callback=lambda _: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]
    later = per_step[1:] or per_step
    out = {
        "case": case, "shape": shape, "params_M": round(params / 1e6, 1), "dtype": args.dtype,
        "device": str(device), "threads": args.threads, "checkpointing": args.checkpointing,
        "decode_size": args.decode_size if kind == "sd" else None,
        "first_step_s": round(per_step[0], 2), "s_per_step": round(sum(later) / len(later), 2),
        "weights_MB": round(weights_rss - base_rss), "peak_above_imports_MB": round(rss_mb() - base_rss),
        "peak_rss_MB": round(rss_mb()), "load_avg_1min": round(os.getloadavg()[0], 1),
    }
    if device.type == "cuda":
        out["cuda_max_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, action="append", help="default: all")
    parser.add_argument("--size", type=int, default=64, help="pixel UNet image side")
    parser.add_argument("--sd-size", type=int, default=256, help="SD image side (latents side / 8)")
    parser.add_argument("--decode-size", type=int, default=None, help="SD decode_size option")
    parser.add_argument("--steps", type=int, default=3, help="guided steps timed (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded CPU, OpenMP spinning made 2 threads ~8x slower)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on UNet and VAE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.case[0], args)))
        return
    for case in args.case or CASES:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--case", case] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--case") and a not in CASES]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
        if line is None:
            print(json.dumps({"case": case, "error": (proc.stderr.strip().splitlines() or ["?"])[-1],
                              "returncode": proc.returncode}), flush=True)
        else:
            print(line, flush=True)


if __name__ == "__main__":
    main()
