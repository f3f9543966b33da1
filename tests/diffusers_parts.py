"""Tiny randomly initialised FLUX / SD3 parts for the diffusers integration tests (nothing is downloaded)."""
from __future__ import annotations

import types

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

SIZE = 32          # image side in pixels; the tiny VAE downsamples by 2, so latents are 16 x 16
SEQ, DIM = 7, 32   # text tokens and their width
# float32 on CPU: diffusers' loop and glass_fast's sum the same terms in a different order.
ATOL = 2e-5


def tiny_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=SIZE, scaling_factor=1.5,
                         shift_factor=0.06).eval()


def tiny_flux_transformer(seed: int = 0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=DIM,
                                  pooled_projection_dim=DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def tiny_flux(transformer=None):
    """FLUX parts; the scheduler has FLUX's resolution-dependent shift with token counts scaled to the tiny
    image (64 tokens)."""
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                          max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    tr = tiny_flux_transformer() if transformer is None else transformer
    return types.SimpleNamespace(transformer=tr, scheduler=sch, vae=tiny_vae())


def tiny_sd3_transformer(seed: int = 1):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=DIM, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def tiny_sd3(transformer=None):
    tr = tiny_sd3_transformer() if transformer is None else transformer
    return types.SimpleNamespace(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 vae=tiny_vae())


def random_embeds(prompts: int, pooled: int, seed: int = 0, negative: bool = False) -> dict:
    """prompt_embeds [P, SEQ, DIM] and pooled_prompt_embeds [P, pooled] (and the negative pair)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(prompt_embeds=torch.randn(prompts, SEQ, DIM, generator=g),
               pooled_prompt_embeds=torch.randn(prompts, pooled, generator=g))
    if negative:
        out.update(negative_prompt_embeds=torch.randn(prompts, SEQ, DIM, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(prompts, pooled, generator=g))
    return out


def random_image(seed: int, count: int = 1):
    """A random SIZE x SIZE RGB uint8 image (a list of ``count`` when count > 1)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    images = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]
    return images[0] if count == 1 else images


def column_mask(columns: slice, count: int = 1):
    """A uint8 mask, white (repainted) in the given pixel columns and in its top 4 (i + 1) rows (so that the
    masks of a list differ), black (kept) elsewhere."""
    import numpy as np
    masks = []
    for i in range(count):
        m = np.zeros((SIZE, SIZE), dtype=np.uint8)
        m[:, columns] = 255
        m[: 4 * (i + 1)] = 255
        masks.append(m)
    return masks[0] if count == 1 else masks


def pipeline(parts, cls_name: str, **components):
    """diffusers' own pipeline class ``cls_name`` around the tiny parts, without text encoders."""
    pytest.importorskip("transformers")  # diffusers' pipeline classes need it even with no text encoders
    import diffusers
    texts = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if "StableDiffusion3" in cls_name:
        texts.update(text_encoder_3=None, tokenizer_3=None)
    pipe = getattr(diffusers, cls_name)(transformer=parts.transformer, scheduler=parts.scheduler, vae=parts.vae,
                                        **texts, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------- FLUX.2
def tiny_flux2_vae(seed: int = 2):
    """AutoencoderKLFlux2 with latents of 4 channels (16 packed features) and random batch-norm statistics, so
    that the latent normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=SIZE).eval()
    vae.bn.running_mean.copy_(0.3 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return vae


def tiny_flux2_transformer(seed: int = 3, guidance_embeds: bool = True):
    """Flux2Transformer2DModel on 16 packed features; guidance_embeds as FLUX.2 [dev] (True) or Klein (False)."""
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=DIM,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds).eval()


def tiny_flux2(guidance_embeds: bool = True):
    """FLUX.2 parts: FLUX.2 [dev]-like (guidance embedding) or Klein-like (none); the scheduler shifts with
    FLUX.2's mu (resolution and step count)."""
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return types.SimpleNamespace(transformer=tiny_flux2_transformer(guidance_embeds=guidance_embeds),
                                 scheduler=sch, vae=tiny_flux2_vae())


def flux2_embeds(prompts: int, seed: int = 0, negative: bool = False) -> dict:
    """prompt_embeds [P, SEQ, DIM] (and negative_prompt_embeds): FLUX.2 has no pooled embeddings."""
    g = torch.Generator().manual_seed(seed)
    out = dict(prompt_embeds=torch.randn(prompts, SEQ, DIM, generator=g))
    if negative:
        out["negative_prompt_embeds"] = torch.randn(prompts, SEQ, DIM, generator=g)
    return out


def flux2_pipeline(parts, cls_name: str = "Flux2Pipeline", **config):
    """diffusers' Flux2Pipeline / Flux2KleinPipeline around the tiny parts, without a text encoder."""
    pytest.importorskip("transformers")  # the FLUX.2 pipeline modules import their text encoders' classes
    import diffusers
    pipe = getattr(diffusers, cls_name)(transformer=parts.transformer, scheduler=parts.scheduler, vae=parts.vae,
                                        text_encoder=None, tokenizer=None, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------- FLUX.1 Fill and Control
def tiny_flux_channels_transformer(extra: int, seed: int = 4):
    """A FLUX.1 transformer reading ``extra`` features per token beyond its 16 state features (FLUX.1 Fill:
    16 masked-image + 16 mask features with the tiny VAE's scale factor 2; Control: 16)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16 + extra, out_channels=16, num_layers=1,
                                  num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=DIM, pooled_projection_dim=DIM, guidance_embeds=True,
                                  axes_dims_rope=(4, 6, 6)).eval()


def sharpen_posterior(vae):
    """The VAE with its posterior's log-variance pinned to -30 (std 3e-7): a draw equals the mean to float
    precision, for comparisons where the pipelines draw per generated image and glass_fast once per prompt."""
    conv = vae.quant_conv
    with torch.no_grad():
        conv.weight[vae.config.latent_channels:] = 0.0
        conv.bias[vae.config.latent_channels:] = -30.0
    return vae


# ----------------------------------------------------------------------------------------- FLUX.1 / SD3 ControlNets
def _unzero(model, seed: int):
    """ControlNets start with zero-initialised output projections (their residuals vanish); random values make
    the residuals, and so the comparisons, sensitive to every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_flux_controlnet(seed: int = 6, **config):
    """A FluxControlNetModel shaped like the tiny FLUX.1 transformer (``num_mode=`` for a union ControlNet,
    ``conditioning_embedding_channels=`` for one embedding pixels with an input hint block, ``num_layers=``)."""
    from diffusers import FluxControlNetModel
    torch.manual_seed(seed)
    config = dict(dict(num_layers=1, num_single_layers=1), **config)
    net = FluxControlNetModel(patch_size=1, in_channels=16, attention_head_dim=16, num_attention_heads=2,
                              joint_attention_dim=DIM, pooled_projection_dim=DIM, guidance_embeds=True,
                              axes_dims_rope=(4, 6, 6), **config).eval()
    return _unzero(net, seed)


def tiny_sd3_controlnet_transformer(seed: int = 7):
    """An SD3 transformer with two blocks: the last block takes no ControlNet residual (context_pre_only)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=DIM, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def tiny_sd3_controlnet(seed: int = 8, **config):
    """An SD3ControlNetModel shaped like ``tiny_sd3_controlnet_transformer`` (``force_zeros_for_pooled_projection``
    defaults to True, as in SD3ControlNetModel; ``joint_attention_dim=None``: one reading no prompt tokens)."""
    from diffusers import SD3ControlNetModel
    torch.manual_seed(seed)
    config = dict(dict(joint_attention_dim=DIM), **config)
    net = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=2, caption_projection_dim=16, pooled_projection_dim=16,
                             out_channels=4, pos_embed_max_size=16, **config).eval()
    return _unzero(net, seed)


def tiny_flux_hint_parts(seed: int = 16):
    """FLUX.1 parts for ControlNets with an input hint block (which embeds pixels, downsampling by 8): a VAE
    downsampling by 4, so that packed tokens are 8 pixels a side too, and a transformer of three double blocks,
    so that the hint ControlNet's two residuals repeat over them (block i reads residual i % 2) rather than
    being spread (block i reads residual floor(i / 1.5))."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=SIZE, scaling_factor=1.5,
                        shift_factor=0.06).eval()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=DIM, pooled_projection_dim=DIM,
                                guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    parts = tiny_flux(tr)
    parts.vae = vae
    return parts


def tiny_clip():
    """A randomly initialised tiny CLIP (seeded) and a byte-level tokenizer: enough for CLIPScoreReward."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)

    def tokenize(texts, **_):  # byte-level ids, padded
        ids = [[b % 60 + 2 for b in t.encode()][:14] for t in texts]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [1] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}

    return transformers.CLIPModel(cfg), tokenize
