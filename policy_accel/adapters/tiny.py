"""Tiny random Stable Diffusion and DiT pipelines, for tests and CPU benchmarks.

No weights can be downloaded here, so these build the real diffusers / transformers component
classes from small configs with fixed seeds (as diffusers' own fast tests do): a UNet and VAE of
a few thousand parameters, a two-layer CLIP text encoder, and a CLIP tokenizer whose vocabulary
and merges files are written to a folder (byte-level symbols only, no merges). Images are 32x32;
the VAE downsamples by 2, so latents are ``[B, 4, 16, 16]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, StableDiffusionPipeline
from diffusers.models import DiTTransformer2DModel, UNet2DConditionModel

IMAGE_SIZE = 32


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) reversible byte -> printable-unicode table, as a list of 256 symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes, strict=True))]


def tiny_tokenizer(folder: str | Path, model_max_length: int = 16):
    """A CLIP tokenizer over single byte symbols (514 tokens), files written to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=IMAGE_SIZE,
    ).eval()


def tiny_stable_diffusion(folder: str | Path, scheduler=None, seed: int = 0):
    """A tiny :class:`StableDiffusionPipeline` (no safety checker); tokenizer files go to
    ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=2,
    ).eval()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=8,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    ).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(Path(folder) / "tokenizer_files"),
        unet=unet,
        scheduler=scheduler or DDIMScheduler(beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_dit(scheduler=None, seed: int = 0, learn_sigma: bool = True) -> DiTPipeline:
    """A tiny :class:`DiTPipeline` over 1001 class ids (1000 classes and the null class)."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=8 if learn_sigma else 4,
        num_layers=1,
        norm_num_groups=2,
        sample_size=IMAGE_SIZE // 2,
        patch_size=4,
        num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(seed + 2),
        scheduler=scheduler or DDIMScheduler(),
    )


def parameter_count(pipe) -> dict[str, int]:
    """Parameters per model component (to keep the tiny models tiny)."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
