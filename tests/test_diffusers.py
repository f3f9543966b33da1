"""The diffusers integration on tiny randomly initialised FLUX / SD3 transformers and VAEs built from configs.

Nothing is downloaded. The cross-check against diffusers itself: glass_fast's ODE (one Euler step per
transition on the pipeline's sigma grid) against diffusers' FlowMatchEulerDiscreteScheduler loop driving the
same transformer the way the pipelines do, and against the pipeline objects where transformers (needed
to build them) is installed.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from glass_fast.integrations import diffusers as gd  # noqa: E402
from glass_fast.integrations.rewards import CLIPScoreReward, LatentReward  # noqa: E402
from diffusers_parts import ATOL, DIM, SEQ, SIZE, pipeline, random_embeds, tiny_clip  # noqa: E402


def _flux_ids(n_txt: int, h2: int, w2: int):
    img = torch.zeros(h2, w2, 3)
    img[..., 1] += torch.arange(h2)[:, None]
    img[..., 2] += torch.arange(w2)[None, :]
    return torch.zeros(n_txt, 3), img.reshape(h2 * w2, 3)


def _flux_raw(tr, x, sigma, emb, pooled, guidance):
    txt_ids, img_ids = _flux_ids(emb.shape[1], SIZE // 4, SIZE // 4)
    return tr(hidden_states=x, timestep=sigma, guidance=torch.full((x.shape[0],), guidance), pooled_projections=pooled,
              encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def _sd3_raw(tr, x, timestep, emb, pooled, neg, neg_pooled, w):
    out = tr(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
             encoder_hidden_states=torch.cat([neg, emb]), pooled_projections=torch.cat([neg_pooled, pooled]),
             return_dict=False)[0]
    unc, con = out.chunk(2)
    return unc + w * (con - unc)


# ------------------------------------------------------------------------------------------- the adapter
def test_import_is_lazy_and_names_the_extra(monkeypatch):
    code = "import sys, glass_fast, glass_fast.integrations; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    for name in [m for m in sys.modules if m.startswith("glass_fast.integrations.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"glass_fast\[diffusers\]"):
        importlib.import_module("glass_fast.integrations.diffusers")


def test_flux_velocity_and_denoiser_are_the_sign_flipped_transformer(flux):
    flow = gd.as_flow(flux)
    cond = gd.encode(flow, **random_embeds(2, DIM))
    model = flow.flow_model(cond, 3, SIZE, SIZE, guidance_scale=2.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, 16, generator=g)
    t = torch.rand(6, generator=g)
    rows = torch.arange(6) // 3
    with torch.no_grad():
        raw = _flux_raw(flux.transformer, x, 1 - t, cond.prompt_embeds[rows], cond.pooled[rows], 2.5)
        u, d = model.velocity(x, t), model.denoise(x, t)
    torch.testing.assert_close(u, -raw, atol=1e-6, rtol=1e-5)
    # Linear path: D = x + (1 - t) u = x - sigma v, the diffusers x0-prediction.
    torch.testing.assert_close(d, x - (1 - t)[:, None, None] * raw, atol=1e-6, rtol=1e-5)


def test_sd3_guided_velocity_is_the_sign_flipped_cfg_combination(sd3):
    flow = gd.as_flow(sd3)
    cond = gd.encode(flow, cfg=True, **random_embeds(2, 16, negative=True))
    model = flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=4.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.rand(4, generator=g)
    rows = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        raw = _sd3_raw(sd3.transformer, x, (1 - t) * 1000, cond.prompt_embeds[rows], cond.pooled[rows],
                       cond.negative_embeds[rows], cond.negative_pooled[rows], 4.0)
        u, d = model.velocity(x, t), model.denoise(x, t)
    torch.testing.assert_close(u, -raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, x - (1 - t)[:, None, None, None] * raw, atol=1e-5, rtol=1e-5)


def test_flux_true_cfg_is_the_guided_field_of_one_stacked_call(flux):
    emb = random_embeds(1, DIM, seed=14, negative=True)
    lat = gd.as_flow(flux).noise(2, SIZE, SIZE, torch.Generator().manual_seed(15))
    kw = dict(method="ode", transitions=2, inner_steps=1, num_images_per_prompt=2, height=SIZE, width=SIZE,
              latents=lat, output_type="latent")
    guided = gd.sample(flux, true_cfg_scale=3.0, **kw, **emb)
    # By hand: sigma grid, u = -(v_neg + 3 (v_pos - v_neg)), Euler.
    sigmas = gd.as_flow(flux).sigmas(2, SIZE, SIZE)
    x, rows = lat.clone(), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            pos = _flux_raw(flux.transformer, x, s0.expand(2), emb["prompt_embeds"][rows],
                            emb["pooled_prompt_embeds"][rows], 3.5)
            neg = _flux_raw(flux.transformer, x, s0.expand(2), emb["negative_prompt_embeds"][rows],
                            emb["negative_pooled_prompt_embeds"][rows], 3.5)
            x = x + (s1 - s0) * (neg + 3.0 * (pos - neg))
    torch.testing.assert_close(guided, x, atol=ATOL, rtol=0)
    # Without true_cfg_scale > 1 the negative branch is not run.
    plain = gd.sample(flux, **kw, **emb)
    assert (plain - guided).abs().max() > 1e-3


def test_max_batch_chunks_give_the_same_field(sd3):
    flow = gd.as_flow(sd3)
    cond = gd.encode(flow, cfg=True, **random_embeds(3, 16, negative=True))
    x, t = torch.randn(6, 4, 16, 16), torch.rand(6)
    whole = flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=3.0)
    chunked = flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=3.0, max_batch=4)  # 2 latents (x2 for CFG) per call
    with torch.no_grad():
        torch.testing.assert_close(chunked.velocity(x, t), whole.velocity(x, t), atol=1e-5, rtol=1e-5)


def test_one_adapter_per_call_and_flux_inputs_built_once_per_model(flux, monkeypatch):
    """sample builds the pipeline's adapter once, and its FlowModel builds FLUX's position ids and guidance
    input once, not in each of its transformer calls."""
    from glass_fast.integrations import diffusers_adapter as da
    built, ids, calls = [], [], []
    init, image_ids = da.DiffusersFlow.__init__, da.packed_image_ids
    monkeypatch.setattr(da.DiffusersFlow, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    monkeypatch.setattr(da, "packed_image_ids", lambda *a, **k: ids.append(1) or image_ids(*a, **k))
    hook = flux.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        gd.sample(flux, method="ode", transitions=3, inner_steps=2, height=SIZE, width=SIZE, output_type="latent",
                  **random_embeds(1, DIM))
    finally:
        hook.remove()
    assert (len(built), len(ids), len(calls)) == (1, 1, 6)


def test_flux_decoding_is_the_pipelines_unpack_scale_and_shift(flux):
    flow = gd.as_flow(flux)
    x = torch.randn(2, 64, 16)
    # The pipeline's unpacking: tokens of 2x2 patches back to [N, C, h, w].
    lat = x.view(2, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 16, 16)
    torch.testing.assert_close(flow.unpack(x, SIZE, SIZE), lat, atol=0, rtol=0)
    torch.testing.assert_close(flow.pack(lat), x, atol=0, rtol=0)
    with torch.no_grad():
        want = (flux.vae.decode(lat / 1.5 + 0.06).sample / 2 + 0.5).clamp(0, 1)
        got = gd.postprocess(flow, x, SIZE, SIZE, "pt", max_batch=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- the diffusers cross-check
def test_flux_ode_reproduces_the_diffusers_euler_loop(flux):
    steps, emb = 6, random_embeds(1, DIM, seed=5)
    flow = gd.as_flow(flux)
    lat = flow.noise(2, SIZE, SIZE, torch.Generator().manual_seed(6))
    # The pipeline's schedule: sigmas linspace(1, 1/N, N) shifted with mu linear in the token count.
    mu = 64 * (1.15 - 0.5) / (256 - 16) + 0.5 - 16 * (1.15 - 0.5) / (256 - 16)
    sched = FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(flow.time_grid(steps, SIZE, SIZE), 1 - sched.sigmas.double(), atol=0, rtol=0)
    x = lat.clone()
    rows = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        for ts in sched.timesteps:
            v = _flux_raw(flux.transformer, x, ts.expand(2) / 1000, emb["prompt_embeds"][rows],
                          emb["pooled_prompt_embeds"][rows], 3.5)
            x = sched.step(v, ts, x, return_dict=False)[0]
    ours = gd.sample(flux, method="ode", transitions=steps, inner_steps=1, num_images_per_prompt=2, height=SIZE,
                     width=SIZE, latents=lat, output_type="latent", **emb)
    assert ours.shape == x.shape == (2, 64, 16)
    torch.testing.assert_close(ours, x, atol=ATOL, rtol=0)


def test_sd3_ode_with_cfg_reproduces_the_diffusers_euler_loop(sd3):
    steps, w, emb = 5, 5.0, random_embeds(2, 16, seed=7, negative=True)
    flow = gd.as_flow(sd3)
    lat = flow.noise(2, SIZE, SIZE, torch.Generator().manual_seed(8))
    sched = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    sched.set_timesteps(steps)
    torch.testing.assert_close(flow.time_grid(steps, SIZE, SIZE), 1 - sched.sigmas.double(), atol=0, rtol=0)
    x = lat.clone()
    with torch.no_grad():
        for ts in sched.timesteps:
            v = _sd3_raw(sd3.transformer, x, ts.expand(2), emb["prompt_embeds"], emb["pooled_prompt_embeds"],
                         emb["negative_prompt_embeds"], emb["negative_pooled_prompt_embeds"], w)
            x = sched.step(v, ts, x, return_dict=False)[0]
    ours = gd.sample(sd3, method="ode", transitions=steps, inner_steps=1, guidance_scale=w, height=SIZE,
                     width=SIZE, latents=lat, output_type="latent", **emb)
    torch.testing.assert_close(ours, x, atol=ATOL, rtol=0)


def test_flux_ode_reproduces_the_pipeline_itself(flux):
    pipe = pipeline(flux, "FluxPipeline")
    emb = random_embeds(1, DIM, seed=9)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(10))
    theirs = pipe(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                  num_inference_steps=4, guidance_scale=3.5, height=SIZE, width=SIZE, latents=lat.clone(),
                  output_type="latent").images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, guidance_scale=3.5, height=SIZE,
                     width=SIZE, latents=lat, output_type="latent", **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # Decoding too: unpacking, the VAE's scaling and shift, and the [0, 1] postprocessing.
    with torch.no_grad():
        img_theirs = pipe(prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                          num_inference_steps=4, height=SIZE, width=SIZE, latents=lat.clone(), output_type="pt").images
    img_ours = gd.postprocess(gd.as_flow(pipe), theirs, SIZE, SIZE, "pt")
    torch.testing.assert_close(img_ours, img_theirs, atol=1e-5, rtol=0)


def test_joint_attention_kwargs_reach_every_transformer_call_as_in_the_pipeline(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class ScaledAttention(FluxAttnProcessor):
        """The default attention with its output scaled by a joint_attention_kwargs entry."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, out_scale=1.0):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            return tuple(o * out_scale for o in out) if isinstance(out, tuple) else out * out_scale

    pipe = pipeline(flux, "FluxPipeline")
    emb = random_embeds(1, DIM, seed=11)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(12))
    default = flux.transformer.attn_processors
    flux.transformer.set_attn_processor(ScaledAttention())
    try:
        kw = dict(height=SIZE, width=SIZE, output_type="latent", **emb)
        theirs = pipe(num_inference_steps=3, latents=lat.clone(), joint_attention_kwargs={"out_scale": 0.3},
                      **kw).images
        ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat,
                         joint_attention_kwargs={"out_scale": 0.3}, **kw)
        unscaled = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, **kw)
        with pytest.raises(TypeError, match="joint_attention_kwargs must be a dict or None"):
            gd.sample(pipe, joint_attention_kwargs=[("out_scale", 0.3)], **kw)
    finally:
        flux.transformer.set_attn_processor(default)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - unscaled).abs().max() > 100 * ATOL     # the argument changed the field


def test_sd3_ode_with_cfg_reproduces_the_pipeline_itself(sd3):
    pipe = pipeline(sd3, "StableDiffusion3Pipeline")
    emb = random_embeds(2, 16, seed=11, negative=True)
    lat = gd.as_flow(pipe).noise(2, SIZE, SIZE, torch.Generator().manual_seed(12))
    theirs = pipe(num_inference_steps=4, guidance_scale=4.0, height=SIZE, width=SIZE, latents=lat.clone(),
                  output_type="latent", **emb).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, guidance_scale=4.0, height=SIZE,
                     width=SIZE, latents=lat, output_type="latent", **emb)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("start,stop", [(0.01, 0.6), (0.3, 0.9), (0.5, 0.55)])
def test_sd3_skip_layer_guidance_reproduces_the_pipeline(sd3, start, stop):
    pipe = pipeline(sd3, "StableDiffusion3Pipeline")
    emb = random_embeds(2, 16, seed=14, negative=True)
    lat = gd.as_flow(pipe).noise(2, SIZE, SIZE, torch.Generator().manual_seed(15))
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.5, skip_layer_guidance_start=start,
               skip_layer_guidance_stop=stop)
    kw = dict(guidance_scale=4.0, height=SIZE, width=SIZE, output_type="latent", **emb)
    theirs = pipe(num_inference_steps=4, latents=lat.clone(), **slg, **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, latents=lat, **slg, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    if start < stop - 0.25:   # the window holds a step: the guidance changed the result
        plain = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, latents=lat, **kw)
        assert (ours - plain).abs().max() > 100 * ATOL


def test_skip_layer_guidance_needs_sd3_with_cfg(flux, sd3):
    with pytest.raises(ValueError, match="skip-layer guidance needs a Stable Diffusion 3 transformer"):
        gd.sample(flux, height=SIZE, width=SIZE, skip_guidance_layers=[0], **random_embeds(1, DIM))
    with pytest.raises(ValueError, match="skip-layer guidance needs"):
        gd.sample(sd3, guidance_scale=1.0, height=SIZE, width=SIZE, skip_guidance_layers=[0], **random_embeds(1, 16))
    with pytest.raises(ValueError, match="skip_guidance_layers must be a list of block indices"):
        gd.sample(sd3, guidance_scale=4.0, height=SIZE, width=SIZE, skip_guidance_layers=3,
                  **random_embeds(1, 16, negative=True))
    for run in (lambda **kw: gd.sample(sd3, cuda_graph=True, **kw),
                lambda **kw: gd.steer(sd3, reward=lambda i, p: i.mean((1, 2, 3)), cuda_graph=True, **kw)):
        with pytest.raises(ValueError, match="skip-layer guidance decides on the host"):
            run(guidance_scale=4.0, height=SIZE, width=SIZE, skip_guidance_layers=[0],
                **random_embeds(1, 16, negative=True))


def _word_tokenizer(transformers, max_length):
    """A real fast tokenizer over a tiny word vocabulary (built in memory, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "a", "cat", "dog", "red", "on", "mat", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                model_max_length=max_length)


def test_flux_prompts_through_text_encoders_match_the_pipeline(flux):
    transformers = pytest.importorskip("transformers")
    from diffusers import FluxPipeline
    torch.manual_seed(2)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=16, hidden_size=DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=DIM)).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=16, d_model=DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    pipe = FluxPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=clip,
                        tokenizer=_word_tokenizer(transformers, 12), text_encoder_2=t5,
                        tokenizer_2=_word_tokenizer(transformers, 8), transformer=flux.transformer)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a dog on a mat"]
    lat = gd.as_flow(pipe).noise(4, SIZE, SIZE, torch.Generator().manual_seed(3))
    theirs = pipe(prompt=prompts, num_images_per_prompt=2, num_inference_steps=3, height=SIZE, width=SIZE,
                  latents=lat.clone(), max_sequence_length=8, output_type="latent").images
    # Each prompt encoded once and shared by its two rows (prompt-major, like the pipeline's repeat).
    ours = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, num_images_per_prompt=2,
                     height=SIZE, width=SIZE, latents=lat, max_sequence_length=8, output_type="latent")
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # A separate T5 prompt (prompt_2), and true CFG with negative prompts for both encoders.
    kw = dict(num_images_per_prompt=2, height=SIZE, width=SIZE, max_sequence_length=8, output_type="latent",
              prompt_2=["a mat", "a red dog"], negative_prompt=["a cat", "a mat"], negative_prompt_2=["dog", "cat"],
              true_cfg_scale=2.0)
    theirs = pipe(prompt=prompts, num_inference_steps=3, latents=lat.clone(), **kw).images
    ours_2 = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, latents=lat, **kw)
    torch.testing.assert_close(ours_2, theirs, atol=ATOL, rtol=0)
    assert (ours_2 - ours).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match="prompt_2 has 3 entries but there are 2 prompts"):
        gd.sample(pipe, prompts, prompt_2=["a", "b", "c"], height=SIZE, width=SIZE, max_sequence_length=8)
    with pytest.raises(ValueError, match="prompt_3 / negative_prompt_3 are for Stable Diffusion 3"):
        gd.sample(pipe, prompts, prompt_3="a", height=SIZE, width=SIZE, max_sequence_length=8)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["glass", "sde"])
def test_stochastic_methods_give_finite_images_of_the_right_size(flux, sd3, method):
    for pipe, pooled, extra in ((flux, DIM, {}), (sd3, 16, {"guidance_scale": 3.0})):
        emb = random_embeds(2, pooled, negative=pipe is sd3)
        imgs = gd.sample(pipe, method=method, transitions=3, inner_steps=2, num_images_per_prompt=2, height=SIZE,
                         width=SIZE, generator=torch.Generator().manual_seed(11), output_type="pt", **emb, **extra)
        assert imgs.shape == (4, 3, SIZE, SIZE)
        assert torch.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1


def test_glass_is_reproducible_per_seed_and_random_across_seeds(flux):
    emb = random_embeds(1, DIM)
    lat = gd.as_flow(flux).noise(2, SIZE, SIZE, torch.Generator().manual_seed(12))

    def run(seed):
        return gd.sample(flux, method="glass", transitions=3, inner_steps=2, num_images_per_prompt=2, height=SIZE,
                         width=SIZE, latents=lat, generator=torch.Generator().manual_seed(seed),
                         output_type="latent", **emb)

    a, b, c = run(1), run(1), run(2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3  # same start, different transition noise


def test_callback_previews_x0_predictions_without_extra_calls(flux):
    emb = random_embeds(1, DIM)
    lat = gd.as_flow(flux).noise(2, SIZE, SIZE, torch.Generator().manual_seed(30))
    kw = dict(method="glass", transitions=3, inner_steps=2, num_images_per_prompt=2, height=SIZE, width=SIZE,
              latents=lat, output_type="latent", **emb)
    calls = []
    hook = flux.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        plain = gd.sample(flux, generator=torch.Generator().manual_seed(31), **kw)
        plain_calls = len(calls)
        previews = []
        watched = gd.sample(flux, generator=torch.Generator().manual_seed(31),
                            callback=lambda k, t, x, x0: previews.append(gd.as_flow(flux).decode(x0, SIZE, SIZE)),
                            **kw)
    finally:
        hook.remove()
    assert plain_calls == 6 and len(calls) == 2 * plain_calls
    torch.testing.assert_close(watched, plain, atol=1e-5, rtol=0)
    assert len(previews) == 3 and all(p.shape == (2, 3, SIZE, SIZE) and torch.isfinite(p).all() for p in previews)


def test_pil_output(flux):
    imgs = gd.sample(flux, method="glass", transitions=2, inner_steps=1, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(0), output_type="pil", **random_embeds(2, DIM))
    assert len(imgs) == 2 and imgs[0].size == (SIZE, SIZE)


def test_fk_steering_end_to_end(flux):
    seen = []

    def brightness(images, prompts):  # an image-only reward: mean intensity
        seen.append((images.shape, list(prompts)))
        return images.mean(dim=(1, 2, 3))

    emb = random_embeds(2, DIM)
    imgs, res = gd.steer(flux, ["a cat", "a dog"], brightness, particles=3, transitions=3, inner_steps=2,
                         height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(13), max_batch=4, **emb)
    assert imgs.shape == (2, 3, SIZE, SIZE) and torch.isfinite(imgs).all()
    assert res.samples.shape == (2, 3, 64, 16) and res.rewards.shape == (2, 3)
    assert torch.isfinite(res.rewards).all() and torch.isfinite(res.log_weights).all()
    assert res.nfe == 6.0  # GLASS steering reuses the reward's x0-prediction: transitions x inner_steps
    # Scored under max_batch = 4 rows, each row with its own group's prompt.
    assert all(shape[0] <= 4 and shape[1:] == (3, SIZE, SIZE) for shape, _ in seen)
    assert seen[0][1] == ["a cat"] * 3 + ["a dog"]
    # The returned image is the decoded highest-reward particle of its group.
    best = res.rewards.argmax(dim=1)
    torch.testing.assert_close(res.best, res.samples[torch.arange(2), best])


def _redness(images, prompts):  # a differentiable image reward: mean red minus mean green
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))


@pytest.mark.parametrize("detach", [True, False])
def test_image_guidance_raises_the_reward_of_samples(flux, detach):
    emb = random_embeds(2, DIM)
    flow = gd.as_flow(flux)
    lat = flow.noise(4, SIZE, SIZE, torch.Generator().manual_seed(20))
    kw = dict(method="glass", transitions=3, inner_steps=2, num_images_per_prompt=2, height=SIZE, width=SIZE,
              **emb)
    plain = gd.sample(flux, latents=lat, generator=torch.Generator().manual_seed(21), **kw)
    r = {}
    for scale in (3000.0, -3000.0):
        guide = gd.ImageGuidance(_redness, scale=scale, window=(0.0, 1.0), detach=detach)
        guided = gd.sample(flux, latents=lat, generator=torch.Generator().manual_seed(21), guidance=guide,
                           max_batch=3, **kw)
        assert torch.isfinite(guided).all()
        r[scale] = _redness(guided, None)
    # Same noise, same transitions: only the gradient shift differs. Towards the reward it raises every
    # image's reward, against it lowers it.
    assert torch.all(r[3000.0] > _redness(plain, None)) and torch.all(r[-3000.0] < _redness(plain, None))


def test_image_guidance_in_steering_and_bad_guidance(flux):
    emb = random_embeds(1, DIM)
    guide = gd.ImageGuidance(_redness, scale=3000.0, window=(0.0, 1.0))
    _, res = gd.steer(flux, None, _redness, particles=3, transitions=3, inner_steps=2, height=SIZE, width=SIZE,
                      generator=torch.Generator().manual_seed(22), guidance=guide, **emb)
    _, plain = gd.steer(flux, None, _redness, particles=3, transitions=3, inner_steps=2, height=SIZE,
                        width=SIZE, generator=torch.Generator().manual_seed(22), **emb)
    assert res.nfe == plain.nfe == 6.0   # detached guidance adds no transformer calls
    assert res.rewards.mean() > plain.rewards.mean()
    with pytest.raises(TypeError, match="guidance must be an ImageGuidance or None"):
        gd.sample(flux, height=SIZE, width=SIZE, guidance=_redness, **emb)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        gd.ImageGuidance(_redness, scale=float("nan"))


def test_beam_search_through_the_pipeline(flux):
    seen = []

    def brightness(images, prompts):
        seen.append(list(prompts))
        return images.mean(dim=(1, 2, 3))

    imgs, res = gd.steer(flux, ["a cat", "a dog"], brightness, particles=2, algorithm="beam", expansions=3,
                         transitions=3, inner_steps=2, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(23), **random_embeds(2, DIM))
    assert imgs.shape == (2, 3, SIZE, SIZE) and res.samples.shape == (2, 2, 64, 16)
    assert torch.all(res.rewards[:, 0] >= res.rewards[:, 1])        # best first
    assert res.nfe == 1 + 3 * 2 * 3 - 3
    # Children rows are prompt-major: each prompt's 2 beams x 3 children carry that prompt.
    assert seen[0] == ["a cat"] * 6 + ["a dog"] * 6
    with pytest.raises(ValueError, match="algorithm must be 'fk' or 'beam'"):
        gd.steer(flux, None, brightness, algorithm="smc", height=SIZE, width=SIZE, **random_embeds(1, DIM))
    with pytest.raises(ValueError, match="guidance is not supported with algorithm='beam'"):
        gd.steer(flux, None, brightness, algorithm="beam", guidance=gd.ImageGuidance(brightness, 1.0),
                 height=SIZE, width=SIZE, **random_embeds(1, DIM))


def test_sd3_steering_with_cfg_and_the_value_potential(sd3):
    seen = []

    def redness(images, prompts):
        seen.append(list(prompts))
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))

    emb = random_embeds(2, 16, seed=16, negative=True)
    imgs, res = gd.steer(sd3, ["red", "blue"], redness, particles=2, transitions=2, inner_steps=2,
                         guidance_scale=3.0, potential="value", value_samples=2, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(17), **emb)
    assert imgs.shape == (2, 3, SIZE, SIZE) and torch.isfinite(imgs).all()
    assert res.samples.shape == (2, 2, 4, 16, 16) and torch.isfinite(res.log_weights).all()
    # Posterior-value draws score 2 copies of each particle, in place: prompts stay with their rows.
    assert ["red"] * 4 + ["blue"] * 4 in seen


def test_rows_map_to_prompts_for_repeated_batches(flux):
    flow = gd.as_flow(flux)
    cond = gd.encode(flow, **random_embeds(2, DIM, seed=18))
    model = flow.flow_model(cond, 2, SIZE, SIZE)
    x, t = torch.randn(4, 64, 16), torch.rand(4)
    with torch.no_grad():
        once = model.velocity(x, t)
        twice = model.velocity(x.repeat_interleave(2, dim=0), t.repeat_interleave(2))
    torch.testing.assert_close(twice, once.repeat_interleave(2, dim=0), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
def test_unsupported_pipelines_are_rejected(flux):
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        gd.sample(types.SimpleNamespace(transformer=torch.nn.Linear(2, 2), scheduler=flux.scheduler),
                  **random_embeds(1, DIM))
    with pytest.raises(TypeError, match="pipe must be a FLUX or Stable Diffusion 3 pipeline"):
        gd.sample(object(), **random_embeds(1, DIM))
    with pytest.raises(TypeError, match="flow-matching scheduler"):
        gd.sample(types.SimpleNamespace(transformer=flux.transformer, scheduler=object()), **random_embeds(1, DIM))


def test_prompt_layout_mismatches_are_named(flux):
    with pytest.raises(ValueError, match="prompt has 3 entries but prompt_embeds has 2 rows"):
        gd.sample(flux, ["a", "b", "c"], height=SIZE, width=SIZE, **random_embeds(2, DIM))
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 3, 64, 16\)"):
        gd.steer(flux, None, lambda im, p: im.mean((1, 2, 3)), particles=3, height=SIZE, width=SIZE,
                 latents=torch.randn(3, 3, 64, 16), **random_embeds(2, DIM))
    with pytest.raises(ValueError, match=r"latents must have shape \(4, 64, 16\)"):
        gd.sample(flux, num_images_per_prompt=2, height=SIZE, width=SIZE, latents=torch.randn(3, 64, 16),
                  **random_embeds(2, DIM))
    model = gd.as_flow(flux).flow_model(gd.encode(gd.as_flow(flux), **random_embeds(2, DIM)), 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"2 prompt\(s\) x 3 rows = 6 rows \(prompt-major\) or a multiple"):
        model.velocity(torch.randn(5, 64, 16), 0.5)
    flow, emb = gd.as_flow(flux), random_embeds(2, DIM, negative=True)
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds"):
        gd.encode(flow)
    with pytest.raises(TypeError, match="prompt must be a string, a non-empty list of strings or None, got 3"):
        gd.encode(flow, 3, **random_embeds(2, DIM))
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds is required with negative_prompt_embeds"):
        gd.encode(flow, **{k: v for k, v in emb.items() if k != "negative_pooled_prompt_embeds"})
    with pytest.raises(ValueError, match=r"prompt_embeds must be a Tensor with 3 dimensions, got \(2, 32\)"):
        gd.encode(flow, prompt_embeds=torch.randn(2, DIM), pooled_prompt_embeds=torch.randn(2, DIM))
    with pytest.raises(ValueError, match="pooled_prompt_embeds has 1 rows but there are 2 prompts"):
        gd.encode(flow, prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=torch.randn(1, DIM))


def test_missing_encoders_and_bad_sizes_are_named(flux, sd3):
    with pytest.raises(ValueError, match="prompt_embeds and pooled_prompt_embeds are required"):
        gd.sample(flux, "a cat", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        gd.sample(sd3, guidance_scale=5.0, height=SIZE, width=SIZE, **random_embeds(1, 16))
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        gd.sample(flux, height=30, width=SIZE, **random_embeds(1, DIM))
    with pytest.raises(ValueError, match="output_type must be one of"):
        gd.sample(flux, height=SIZE, width=SIZE, output_type="jpg", **random_embeds(1, DIM))
    with pytest.raises(ValueError, match="pooled_prompt_embeds is required"):
        gd.sample(flux, height=SIZE, width=SIZE, prompt_embeds=torch.randn(1, SEQ, DIM))


def test_reward_of_the_wrong_shape_is_named(flux):
    with pytest.raises(ValueError, match=r"reward must return a Tensor of shape \[2\].*got shape \[2, 1\]"):
        gd.steer(flux, None, lambda im, p: im.mean((2, 3))[:, :1], particles=2, transitions=2, inner_steps=1,
                 height=SIZE, width=SIZE, **random_embeds(1, DIM))
    with pytest.raises(TypeError, match="reward must be callable"):
        gd.steer(flux, None, "clip", particles=2, height=SIZE, width=SIZE, **random_embeds(1, DIM))
    scorer = LatentReward(gd.as_flow(flux), lambda im, p: im.mean((1, 2, 3)), None, 1, 2, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"1 prompt\(s\) x 2 rows = 2 rows"):
        scorer(torch.randn(3, 64, 16))
    with pytest.raises(TypeError, match=r"reward must return a Tensor\[2\], got list"):
        LatentReward(gd.as_flow(flux), lambda im, p: [0.0, 1.0], None, 1, 2, SIZE, SIZE)(torch.randn(2, 64, 16))
    counts = LatentReward(gd.as_flow(flux), lambda im, p: torch.arange(im.shape[0]), None, 1, 2, SIZE, SIZE)
    assert counts(torch.randn(2, 64, 16)).dtype == torch.float32      # integer scores are converted
    no_vae = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=None)
    with pytest.raises(ValueError, match="image rewards need the pipeline's VAE"):
        gd.steer(no_vae, None, lambda im, p: im.mean((1, 2, 3)), particles=2, height=SIZE, width=SIZE,
                 **random_embeds(1, DIM))


# -------------------------------------------------------------------------------------------------- rewards
def test_clip_score_reward_on_a_tiny_clip():
    reward = CLIPScoreReward(*tiny_clip())
    imgs = torch.rand(3, 3, SIZE, SIZE)
    s = reward(imgs, ["a cat", "a dog", "a cat"])
    assert s.shape == (3,) and torch.all(s.abs() <= 1 + 1e-5)
    # Each score is the cosine of that image's and that prompt's features.
    single = reward(imgs[1:2], ["a dog"])
    torch.testing.assert_close(single, s[1:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CLIPScoreReward.from_pretrained("/nonexistent/clip")
    # Differentiable in the images (for reward guidance), with the cached text features held constant.
    leaf = imgs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(leaf, ["a cat", "a dog", "a cat"]).sum(), leaf)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert not any(f.requires_grad for f in reward._text_cache.values())


def test_clip_score_reward_loads_local_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    import json
    # A byte-pair vocabulary of single letters (no merges) in CLIP's file format, and a tiny CLIP beside it.
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    reward = CLIPScoreReward.from_pretrained(str(tmp_path))
    s = reward(torch.rand(2, 3, SIZE, SIZE), ["a cat", "a dog"])
    assert s.shape == (2,) and torch.isfinite(s).all()


def test_compiled_transitions_equal_eager_through_the_pipeline(flux):
    """compile= runs every transition, transformer calls included, under torch.compile (sample and steer)."""
    emb = random_embeds(1, DIM, seed=30)
    lat = gd.as_flow(flux).noise(2, SIZE, SIZE, torch.Generator().manual_seed(31))
    kw = dict(transitions=2, inner_steps=2, num_images_per_prompt=2, height=SIZE, width=SIZE, output_type="latent",
              latents=lat, **emb)
    eager = gd.sample(flux, generator=torch.Generator().manual_seed(32), **kw)
    compiled = gd.sample(flux, generator=torch.Generator().manual_seed(32), compile={"backend": "eager"}, **kw)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
    reward = lambda images, prompts: images.mean((1, 2, 3))  # noqa: E731
    skw = dict(reward=reward, particles=2, transitions=2, inner_steps=2, height=SIZE, width=SIZE,
               output_type="latent", **emb)
    _, want = gd.steer(flux, generator=torch.Generator().manual_seed(33), **skw)
    _, got = gd.steer(flux, generator=torch.Generator().manual_seed(33), compile={"backend": "eager"}, **skw)
    torch.testing.assert_close(got.samples, want.samples, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="guidance is not supported with compile"):
        gd.sample(flux, compile={"backend": "eager"}, guidance=gd.ImageGuidance(reward, scale=1.0), **kw)


def test_sd3_prompts_for_all_three_text_encoders_match_the_pipeline(sd3):
    transformers = pytest.importorskip("transformers")
    from diffusers import StableDiffusion3Pipeline
    torch.manual_seed(4)

    def clip():  # hidden 8 each: 16 after concatenation (padded to T5's 32); pooled 8 + 8 = 16
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=12, projection_dim=8)).eval()

    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=16, d_model=DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    tok = _word_tokenizer(transformers, 12)
    pipe = StableDiffusion3Pipeline(transformer=sd3.transformer, scheduler=sd3.scheduler, vae=sd3.vae,
                                    text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=_word_tokenizer(transformers, 8))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a dog on a mat"]
    lat = gd.as_flow(pipe).noise(2, SIZE, SIZE, torch.Generator().manual_seed(5))
    kw = dict(height=SIZE, width=SIZE, max_sequence_length=8, output_type="latent", guidance_scale=3.0,
              prompt_2=["a mat", "a dog"], prompt_3=["a red mat", "a cat"], negative_prompt=["dog", "mat"],
              negative_prompt_3=["cat", "a cat"])
    theirs = pipe(prompt=prompts, num_inference_steps=3, latents=lat.clone(), **kw).images
    ours = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, latents=lat, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    plain = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, latents=lat, height=SIZE,
                      width=SIZE, max_sequence_length=8, output_type="latent", guidance_scale=3.0,
                      negative_prompt=["dog", "mat"])
    assert (ours - plain).abs().max() > 100 * ATOL       # the other encoders' prompts changed the field
    # One string stands for every prompt.
    one = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, latents=lat,
                    **{**kw, "prompt_3": "a cat", "negative_prompt_3": "cat"})
    many = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, latents=lat,
                     **{**kw, "prompt_3": ["a cat", "a cat"], "negative_prompt_3": ["cat", "cat"]})
    torch.testing.assert_close(one, many, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_custom_sigmas_reproduce_the_pipeline(flux, sd3, kind):
    parts, cls = (flux, "FluxPipeline") if kind == "flux" else (sd3, "StableDiffusion3Pipeline")
    pipe = pipeline(parts, cls)
    emb = random_embeds(1, DIM if kind == "flux" else 16, seed=40, negative=kind == "sd3")
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(41))
    sigmas = [1.0, 0.8, 0.45, 0.2]
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=3.5 if kind == "flux" else 4.0, **emb)
    theirs = pipe(num_inference_steps=len(sigmas), sigmas=sigmas, latents=lat.clone(), **kw).images
    ours = gd.sample(pipe, method="ode", inner_steps=1, sigmas=sigmas, latents=lat, **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # The sigmas set the number of transitions; a different count is refused rather than ignored.
    same = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, sigmas=sigmas, latents=lat, **kw)
    torch.testing.assert_close(same, ours, atol=0, rtol=0)
    with pytest.raises(ValueError, match="transitions=9 disagrees with sigmas, which set 4 transitions"):
        gd.sample(pipe, transitions=9, sigmas=sigmas, **kw)
    with pytest.raises(ValueError, match="transitions=3 disagrees with grid, which has 4 transitions"):
        gd.sample(pipe, transitions=3, grid=torch.linspace(0, 1, 5, dtype=torch.float64), **kw)
    default = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, latents=lat, **kw)
    assert (ours - default).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match="pass grid .* or sigmas .*, not both"):
        gd.sample(pipe, sigmas=sigmas, grid=torch.linspace(0, 1, 5, dtype=torch.float64), **kw)
    with pytest.raises(ValueError, match="sigmas must be a 1-D sequence of finite noise levels"):
        gd.sample(pipe, sigmas=[[1.0, 0.5]], **kw)
