"""Tiny diffusers models saved to disk, loaded back through the model kinds (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PIXEL_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
SD_UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
SD_VAE = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, num_train_timesteps=1000)
SD_SIZE = 16  # image side of the tiny SD: latents (4, 8, 8) (the tiny VAE downsamples by 2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_clip_tokenizer(folder: Path) -> tuple[Path, int]:
    """vocab.json + merges.txt of a tiny byte-level CLIP BPE (the real format, a few merges), and the
    id of its first special token; no download and no other package's vocabulary needed."""
    chars = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "i"), ("p", "ai"), ("s", "t"), ("st", "r")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder, len(vocab) - len(SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline layout (unet/ + scheduler/) with a tiny random UNet2DModel."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pixel")
    DDPMPipeline(unet=UNet2DModel(**PIXEL_UNET), scheduler=DDPMScheduler()).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of tiny parts."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    UNet2DConditionModel(**SD_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**SD_VAE).save_pretrained(root / "vae")
    raw, bos = write_clip_tokenizer(tmp_path_factory.mktemp("bpe"))
    CLIPTextModel(CLIPTextConfig(bos_token_id=bos, eos_token_id=bos + 1, hidden_size=8, intermediate_size=16,
                                 layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2,
                                 pad_token_id=bos + 1, vocab_size=bos + 2)).save_pretrained(root / "text_encoder")
    CLIPTokenizer.from_pretrained(str(raw), model_max_length=77).save_pretrained(root / "tokenizer")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    return root


class GramEnergy(torch.nn.Module):
    """A style-like energy: ||Gram(tanh(conv(x))) - target||_F with a fixed random filter bank."""

    def __init__(self, target: torch.Tensor, seed: int = 0, channels: int = 4):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(channels, 3, 3, 3, generator=gen) / 3)
        self.register_buffer("target", self.gram(target))

    def gram(self, images):
        f = torch.tanh(torch.nn.functional.conv2d(images, self.weight.to(images.dtype), padding=1)).flatten(2)
        return f @ f.transpose(1, 2) / f.shape[-1]

    def forward(self, images):
        return (self.gram(images) - self.target.to(images.dtype)).flatten(1).norm(dim=1)


class ColorEnergy(torch.nn.Module):
    """Distance of the mean colour to a target colour (a second, simpler condition)."""

    def __init__(self, color=(0.6, -0.4, 0.2)):
        super().__init__()
        self.register_buffer("color", torch.tensor(color))

    def forward(self, images):
        return (images.mean(dim=(2, 3)) - self.color.to(images.dtype)).norm(dim=1)


def reference_image(size: int) -> torch.Tensor:
    """A striped, coloured reference in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = torch.sin(xx.float() * 1.5 + yy.float() * 0.5)
    return torch.stack([stripes, -stripes * 0.5, torch.full_like(stripes, 0.3)]).unsqueeze(0)


def tame(model, sigma0: float = 0.5, mix: float = 0.2):
    """Make a random-weight model a sensible denoiser: eps = exact eps of N(0, sigma0^2 I) data plus
    ``mix`` times the network's output.  The network (and its double backward) stays in the graph;
    only the scale of the samples becomes image-like, so energies are not saturated."""
    import math

    def wrap(fn):
        def eps(x, t):
            a = float(model.alphas_cumprod[t])
            return math.sqrt(1 - a) * x / (a * sigma0**2 + 1 - a) + mix * fn(x, t)
        return eps

    model.eps = wrap(model.eps)
    if hasattr(model, "eps_cond"):
        model.eps_cond = wrap(model.eps_cond)
    return model
