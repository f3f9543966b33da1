"""IP-Adapter image prompts through the diffusers integration, on tiny random FLUX / SD3 transformers with
randomly initialised adapters (nothing downloaded), against the pipelines and direct transformer calls."""
from __future__ import annotations

import numpy as np

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers_parts import (ATOL, DIM, SIZE, pipeline, random_embeds, tiny_flux, tiny_flux_transformer,  # noqa: E402
                             tiny_sd3, tiny_sd3_transformer)

from glass_fast.integrations import diffusers as gd  # noqa: E402

CLIP = 12   # image-encoder embedding width


def _randomize(module: torch.nn.Module, seed: int):
    """Every parameter N(0, 0.3^2): zero-initialised gates would make the adapter a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def flux_ip():
    tr = tiny_flux_transformer()
    g = torch.Generator().manual_seed(5)
    inner = 2 * 16
    image_proj = {"proj.weight": torch.randn(4 * DIM, CLIP, generator=g) * 0.3, "proj.bias": torch.zeros(4 * DIM),
                  "norm.weight": torch.ones(DIM), "norm.bias": torch.zeros(DIM)}
    ip = {f"0.to_{kv}_ip.{w}": torch.randn(*((inner, DIM) if w == "weight" else (inner,)), generator=g) * 0.3
          for kv in "kv" for w in ("weight", "bias")}
    tr._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}], low_cpu_mem_usage=False)
    return tiny_flux(tr)


@pytest.fixture(scope="module")
def sd3_ip():
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection
    tr = tiny_sd3_transformer()
    hidden = 16
    tr.image_proj = IPAdapterTimeImageProjection(embed_dim=CLIP, output_dim=hidden, hidden_dim=hidden, depth=1,
                                                 dim_head=8, heads=2, num_queries=3, timestep_in_dim=8).eval()
    procs = {name: SD3IPAdapterJointAttnProcessor2_0(hidden, hidden, 8, timesteps_emb_dim=hidden)
             for name in tr.attn_processors}
    for i, proc in enumerate(procs.values()):
        _randomize(proc, 10 + i)
    tr.set_attn_processor(procs)
    _randomize(tr.image_proj, 9)
    return tiny_sd3(tr)


def _image_embeds(rows: int, seed: int, images: int | None = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, images, CLIP) if images else (rows, 2, CLIP)   # FLUX: [., images, D]; SD3: [., tokens, D]
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_flux_ip_adapter_reproduces_the_pipeline(flux_ip, true_cfg):
    pipe = pipeline(flux_ip, "FluxPipeline")
    emb = random_embeds(1, DIM, seed=1, negative=true_cfg > 1)
    pos, neg = _image_embeds(1, 2), _image_embeds(1, 3)
    lat = gd.as_flow(pipe).noise(2, SIZE, SIZE, torch.Generator().manual_seed(4))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", true_cfg_scale=true_cfg, num_images_per_prompt=2, **emb)
    # The pipeline encodes a black image as the negative image prompt unless given one (it has no encoder here).
    theirs = pipe(num_inference_steps=3, latents=lat.clone(), ip_adapter_image_embeds=[pos],
                  negative_ip_adapter_image_embeds=[neg], **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, ip_adapter_image_embeds=pos,
                     negative_ip_adapter_image_embeds=[neg], **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    other = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, ip_adapter_image_embeds=neg,
                      negative_ip_adapter_image_embeds=[neg], **kw)
    assert (ours - other).abs().max() > 100 * ATOL      # the image prompt steers the field


def test_sd3_ip_adapter_matches_the_pipeline_at_its_first_step_and_recomputes_after(sd3_ip):
    pipe = pipeline(sd3_ip, "StableDiffusion3Pipeline")
    emb = random_embeds(1, 16, seed=5, negative=True)
    pos, neg = _image_embeds(1, 6, images=None), _image_embeds(1, 7, images=None)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(8))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=4.0, **emb)
    # The SD3 pipeline takes the (negative, positive) pair stacked.
    theirs = pipe(num_inference_steps=1, latents=lat.clone(), ip_adapter_image_embeds=torch.cat([neg, pos]),
                  **kw).images
    first = gd.sample(pipe, method="ode", transitions=1, inner_steps=1, latents=lat, ip_adapter_image_embeds=pos,
                      negative_ip_adapter_image_embeds=neg, **kw)
    torch.testing.assert_close(first, theirs, atol=ATOL, rtol=0)

    # Several steps: diffusers' Euler loop with the adapter's tokens recomputed at every call.
    flow = gd.as_flow(pipe)
    sigmas = flow.sigmas(3, SIZE, SIZE)
    x = lat.clone()
    with torch.no_grad():
        for i in range(3):
            ts = (sigmas[i] * 1000).expand(2)
            out = sd3_ip.transformer(hidden_states=torch.cat([x, x]), timestep=ts,
                                     encoder_hidden_states=torch.cat([emb["negative_prompt_embeds"],
                                                                      emb["prompt_embeds"]]),
                                     pooled_projections=torch.cat([emb["negative_pooled_prompt_embeds"],
                                                                   emb["pooled_prompt_embeds"]]),
                                     joint_attention_kwargs={"ip_adapter_image_embeds": torch.cat([neg, pos])},
                                     return_dict=False)[0]
            unc, con = out.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (unc + 4.0 * (con - unc))
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, ip_adapter_image_embeds=pos,
                     negative_ip_adapter_image_embeds=neg, **kw)
    torch.testing.assert_close(ours, x, atol=ATOL, rtol=0)
    # Without a negative image prompt the unconditional branch gets zeros, as in the pipeline.
    zeros = gd.sample(pipe, method="ode", transitions=1, inner_steps=1, latents=lat, ip_adapter_image_embeds=pos,
                      **kw)
    theirs = pipe(num_inference_steps=1, latents=lat.clone(),
                  ip_adapter_image_embeds=torch.cat([torch.zeros_like(pos), pos]), **kw).images
    torch.testing.assert_close(zeros, theirs, atol=ATOL, rtol=0)
    assert (zeros - first).abs().max() > 10 * ATOL      # the negative image prompt steers the field (one step)


def test_every_row_gets_its_prompts_image_prompt_across_chunks(flux_ip):
    flow = gd.as_flow(flux_ip)
    emb = random_embeds(2, DIM, seed=11)
    pos = _image_embeds(2, 12)
    cond = gd.encode(flow, **emb)
    cond.image_embeds = [pos]
    # 2 prompts x 3 rows, transformer calls of 4 rows: the middle call holds rows of both prompts.
    model = flow.flow_model(cond, 3, SIZE, SIZE, guidance_scale=3.5, max_batch=4)
    x = flow.noise(6, SIZE, SIZE, torch.Generator().manual_seed(13))
    t = torch.linspace(0.1, 0.8, 6)
    with torch.no_grad():
        got = model.velocity(x, t)
        want = torch.cat([
            -flow.predict(x[r:r + 1], 1 - t[r:r + 1], emb["prompt_embeds"][r // 3:r // 3 + 1],
                          emb["pooled_prompt_embeds"][r // 3:r // 3 + 1], SIZE, SIZE, 3.5,
                          {"ip_adapter_image_embeds": [pos[r // 3:r // 3 + 1]]}) for r in range(6)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_steering_with_an_image_prompt(flux_ip):
    pipe = pipeline(flux_ip, "FluxPipeline")
    emb = random_embeds(2, DIM, seed=14)
    reward = lambda images, prompts: images[:, 0].mean((1, 2))  # noqa: E731
    images, result = gd.steer(pipe, reward=reward, particles=3, transitions=3, inner_steps=2, height=SIZE,
                              width=SIZE, ip_adapter_image_embeds=[_image_embeds(1, 15)],
                              generator=torch.Generator().manual_seed(16), **emb)
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(result.samples).all()


def test_image_prompt_errors_are_named(flux, flux_ip):
    emb = random_embeds(2, DIM, seed=17)
    kw = dict(height=SIZE, width=SIZE, transitions=1, inner_steps=1, output_type="latent", **emb)
    with pytest.raises(ValueError, match="need an IP-Adapter loaded"):
        gd.sample(flux, ip_adapter_image_embeds=_image_embeds(1, 1), **kw)
    with pytest.raises(ValueError, match="has 2 entries but the transformer has 1 IP-Adapter"):
        gd.sample(flux_ip, ip_adapter_image_embeds=[_image_embeds(1, 1)] * 2, **kw)
    with pytest.raises(ValueError, match=r"leading dimension of 1 or the number of prompts \(2\), got \(3, 1, 12\)"):
        gd.sample(flux_ip, ip_adapter_image_embeds=_image_embeds(3, 1), **kw)
    with pytest.raises(ValueError, match="ip_adapter_image needs the pipeline's image encoder"):
        gd.sample(pipeline(flux_ip, "FluxPipeline"), ip_adapter_image=[torch.zeros(3, 8, 8)], **kw)
    with pytest.raises(ValueError, match="needs ip_adapter_image or ip_adapter_image_embeds"):
        gd.sample(flux_ip, negative_ip_adapter_image_embeds=_image_embeds(1, 1), **kw)
    # FLUX's true CFG defaults the negative image prompt to an encoded black image: that needs the encoder.
    neg = random_embeds(2, DIM, seed=18, negative=True)
    with pytest.raises(ValueError, match="negative_ip_adapter_image needs the pipeline's image encoder"):
        gd.sample(pipeline(flux_ip, "FluxPipeline"), ip_adapter_image_embeds=_image_embeds(1, 1), true_cfg_scale=2.0,
                  **{**kw, **neg})


def test_flux_image_prompts_through_the_image_encoder_match_the_pipeline(flux_ip):
    """Images through the pipeline's image encoder; under true CFG the default negative is a black image."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=CLIP)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pipe = pipeline(flux_ip, "FluxPipeline", image_encoder=encoder, feature_extractor=processor)
    image = (np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8)
    emb = random_embeds(1, DIM, seed=19, negative=True)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(20))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", true_cfg_scale=2.5, **emb)
    theirs = pipe(num_inference_steps=3, latents=lat.clone(), ip_adapter_image=[image], **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, ip_adapter_image=[image], **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sd3_image_prompts_through_the_image_encoder_match_the_pipeline(sd3_ip):
    """SD3 encodes the image to the encoder's penultimate hidden states; the negative branch gets zeros."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=CLIP, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pipe = pipeline(sd3_ip, "StableDiffusion3Pipeline", image_encoder=encoder, feature_extractor=processor)
    image = (np.random.default_rng(4).random((16, 16, 3)) * 255).astype(np.uint8)
    emb = random_embeds(1, 16, seed=21, negative=True)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(22))
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=4.0, **emb)
    theirs = pipe(num_inference_steps=1, latents=lat.clone(), ip_adapter_image=image, **kw).images
    ours = gd.sample(pipe, method="ode", transitions=1, inner_steps=1, latents=lat, ip_adapter_image=image, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
