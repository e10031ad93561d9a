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
defaults: difference products) for n = 2 and 3, cagrad n = 3 with `stack: 1` (one point per network
call instead of all the x_hat_i in one call and all the difference points in another: less memory,
more calls), and cagrad with exact products for n = 2.  Each
case runs the first `--steps` steps of a 100-step DDPM schedule, batch 1; time per step is the mean
over the steps after the first (CUDA synchronised).  On CUDA the cases of one architecture and dtype
share a subprocess (the model is built once, on the GPU) and memory is the growth of
``torch.cuda.max_memory_allocated`` over the weights, reset before each case; on the CPU every case
has its own subprocess and memory is the growth of the peak resident set.  A case that runs out of
memory is reported as such and the others still run.  The table gives ratios to sum with the same n,
architecture and dtype; `--json` is rewritten after every case, so a run cut short keeps its rows.
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
    ("cagrad stack=1", {"kind": "cagrad", "c": 0.5, "stack": 1}, 3),
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
        with torch.device(device):  # random init on the GPU: seconds instead of a minute for SD's UNet
            unet = UNet2DModel(**config).to(dtype)
        model = DiffusersPixelModel(unet, linear_alphas_cumprod(), sample_size=size).to(device)
        gram, color, gram2 = energies(size, device)
        conds = [Condition("style", gram, "adaptive", 0.5), Condition("color", color, "adaptive", 0.5),
                 Condition("style2", gram2, "adaptive", 0.5)]
        return model, conds, f"{size} px"
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from zmagic_core.method.predictions import alphas_cumprod_from_config
    from zmagic_core.models.pretrained.stable_diffusion import StableDiffusionModel

    size = 32 if args.tiny else args.sd_size
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_SD_UNET if args.tiny else SD14_UNET)).to(dtype)
        vae = AutoencoderKL(**(TINY_SD_VAE if args.tiny else SD14_VAE)).to(dtype)
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


def run_cases(args):
    """Run the cases `args.cases` on one model (built once); yield a row per case."""
    import torch

    from zmagic_core.method.solvers import DDPMSolver
    from zmagic_core.sampling.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.memory_cap_gb and device.type == "cuda":  # a smaller card: allocations past the cap run out of memory
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device.index or 0)
    model, conds, shape = build(args.arch, args, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for case in args.cases:
        label, spec, n = CASES[case]
        row = {"arch": args.arch, "shape": shape, "dtype": args.dtype, "device": str(device), "case": label, "n": n}
        if device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name(device)
            torch.cuda.empty_cache()
            sync()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        base_rss = rss_mb()
        recipe_conditions = conds[:n - len(model.model_conditions())]
        pipe = Pipeline(model, DDPMSolver(), make_combiner(spec), recipe_conditions, steps=100)
        pipe.schedule.timesteps = pipe.schedule.timesteps[:args.steps]
        stamps = [time.perf_counter()]

        def callback(_):
            sync()
            stamps.append(time.perf_counter())

        try:
            result = pipe.run([0], batch_size=1, progress=False, callback=callback)
        except torch.cuda.OutOfMemoryError:
            yield dict(row, error="out of memory")
            continue
        per_step = [b - a for a, b in zip(stamps, stamps[1:])]
        later = per_step[1:] or per_step
        row.update(s_per_step=sum(later) / len(later), first_step_s=per_step[0],
                   finite=bool(torch.isfinite(result.samples).all()), errors=len(result.errors))
        if device.type == "cuda":
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
            row["weights_MB"] = base_cuda / 2**20
        else:
            row["peak_MB"] = rss_mb() - base_rss
        limit = getattr(pipe.combiner, "stack_limit", None)
        if limit is not None and limit.lowered:
            row["stack_lowered"] = limit.lowered  # (points in the call that ran out of memory, new stack)
        if result.errors:
            message = str(next(iter(result.errors.values())))
            row["error"] = "out of memory" if "out of memory" in message.lower() else message
        del result, pipe
        yield row


def spawn(args, arch: str, dtype: str, cases: list[int]) -> list[dict]:
    """Run `cases` in a fresh subprocess; a case it did not report (a crash) becomes an error row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--arch", arch, "--dtypes", dtype,
           "--cases", *map(str, cases), "--device", args.device, "--steps", str(args.steps),
           "--threads", str(args.threads), "--pixel-size", str(args.pixel_size), "--sd-size", str(args.sd_size),
           "--memory-cap-gb", str(args.memory_cap_gb or 0)]
    cmd += ["--tiny"] if args.tiny else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    rows = []
    for line in proc.stdout:  # rows as they come, so a long group shows progress
        if line.startswith("{"):
            rows.append(json.loads(line))
            yield rows[-1]
    stderr = proc.stderr.read()
    proc.wait()
    err = "out of memory" if "out of memory" in stderr.lower() else (stderr.strip().splitlines() or ["?"])[-1]
    for case in cases[len(rows):]:
        label, _, n = CASES[case]
        yield {"arch": arch, "dtype": dtype, "case": label, "n": n, "error": err}


def write_json(path: str, rows: list[dict]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


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
        if r.get("stack_lowered"):
            note = (note + "; " if note else "") + "ran out of memory, stack " + " -> ".join(
                [str(r["stack_lowered"][0][0])] + [str(size) for _, size in r["stack_lowered"]])
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
    p.add_argument("--process-per", choices=("case", "group"), default=None,
                   help="a subprocess per case, or per architecture and dtype (default: group on CUDA, case on the CPU)")
    p.add_argument("--only", nargs="*", default=None, metavar="CASE",
                   help="run only the cases with these labels (e.g. sum cagrad; default: all)")
    p.add_argument("--memory-cap-gb", type=float, default=0.0,
                   help="CUDA: cap the process's allocations at this many GiB, as on a smaller card "
                        "(cagrad's stacked calls then split themselves; the rows say so)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", type=int, nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = list(DTYPES) if args.device.startswith("cuda") else ["float32"]
    if args.child:
        args.dtype = args.dtypes[0]
        args.arch = args.arch[0]
        for row in run_cases(args):
            print(json.dumps(row), flush=True)
        return 0
    # CUDA: one subprocess per architecture and dtype (peak memory is reset per case); CPU: one per case
    grouped = (args.process_per or ("group" if args.device.startswith("cuda") else "case")) == "group"
    rows = []
    for arch in args.arch:
        for dtype in args.dtypes:
            chosen = [c for c in range(len(CASES)) if args.only is None or CASES[c][0] in args.only]
            groups = [chosen] if grouped else [[c] for c in chosen]
            for cases in groups:
                for row in spawn(args, arch, dtype, cases):
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.json:
                        write_json(args.json, rows)
    cards = sorted({r["gpu"] for r in rows if "gpu" in r})
    print(f"device: {', '.join(cards) or args.device}, {args.steps} steps per case (the first is warm-up)")
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
