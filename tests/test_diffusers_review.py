"""Arguments of the diffusers adapter's public parts (``DiffusersFlow``, ``SkipLayerGuidance``, the rewards) that
were once accepted and run silently wrong or failed with an unrelated error: each is now refused with an error
naming the argument, or read as the pipelines read it."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from glass_fast.integrations import diffusers as gd  # noqa: E402
from glass_fast.integrations.rewards import CLIPScoreReward, LatentReward  # noqa: E402
from diffusers_parts import DIM, SEQ, SIZE, pipeline, random_embeds, tiny_clip  # noqa: E402

FAST = dict(method="ode", transitions=2, inner_steps=1, height=SIZE, width=SIZE, output_type="latent")


# ------------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("steps", [0, -2, 2.5, True, None])
def test_sigmas_need_a_positive_integer_step_count(flux, sd3, steps):
    for parts in (flux, sd3):
        with pytest.raises(ValueError, match=rf"steps must be an integer >= 1 .*got {steps!r}"):
            gd.as_flow(parts).sigmas(steps, SIZE, SIZE)


def test_sigmas_refuse_a_step_count_that_disagrees_with_custom_sigmas(flux):
    flow = gd.as_flow(flux)
    with pytest.raises(ValueError, match=r"steps=10 disagrees with the 3 custom sigmas"):
        flow.sigmas(10, SIZE, SIZE, [1.0, 0.5, 0.2])
    custom = [1.0, 0.5, 0.2]
    torch.testing.assert_close(flow.sigmas(3, SIZE, SIZE, custom), flow.sigmas(None, SIZE, SIZE, custom))


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_shift_set_on_the_scheduler_is_the_pipelines_shift(sd3, dynamic):
    """set_shift changes the scheduler's shift, not its config; the pipelines' set_timesteps reads the former
    (with dynamic shifting mu replaces it, for the pipelines and here)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    flow = gd.DiffusersFlow(sd3.transformer, sched, sd3.vae)
    sched.set_shift(6.0)   # after the adapter was built: read when the schedule is
    sched.set_timesteps(4, **({"mu": _sd3_mu(flow)} if dynamic else {}))
    torch.testing.assert_close(flow.sigmas(4, SIZE, SIZE), sched.sigmas, atol=1e-7, rtol=0)
    plain = gd.DiffusersFlow(sd3.transformer, FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic),
                             sd3.vae).sigmas(4, SIZE, SIZE)
    assert dynamic == bool(torch.equal(plain, sched.sigmas))


def _sd3_mu(flow):
    from glass_fast.integrations.diffusers_adapter import _shift_mu
    h, w = flow.latent_hw(SIZE, SIZE)
    p = flow.transformer.config.patch_size
    return _shift_mu((h // p) * (w // p), flow.scheduler_config, 1.16)


def test_a_pipelines_set_shift_reaches_the_sampler(sd3):
    """The ODE through sample equals StableDiffusion3Pipeline after pipe.scheduler.set_shift(...)."""
    parts = types.SimpleNamespace(transformer=sd3.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  vae=sd3.vae)
    pipe = pipeline(parts, "StableDiffusion3Pipeline")
    pipe.scheduler.set_shift(8.0)
    emb = random_embeds(1, 16, seed=3, negative=True)
    lat = gd.as_flow(pipe).noise(1, SIZE, SIZE, torch.Generator().manual_seed(4))
    kw = dict(guidance_scale=3.0, height=SIZE, width=SIZE, output_type="latent", **emb)
    theirs = pipe(num_inference_steps=3, latents=lat.clone(), **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, latents=lat, **kw)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- the flow model
def test_flow_model_checks_its_arguments(flux, sd3):
    flow = gd.as_flow(flux)
    cond = gd.encode(flow, **random_embeds(1, DIM))
    x, t = torch.randn(2, 64, 16), torch.full((2,), 0.5)
    for per_prompt in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"per_prompt must be an integer >= 1, got {per_prompt!r}"):
            flow.flow_model(cond, per_prompt, SIZE, SIZE)
    for max_batch in (0, 2.0):
        with pytest.raises(ValueError, match=rf"max_batch must be an integer >= 1 or None, got {max_batch!r}"):
            flow.flow_model(cond, 2, SIZE, SIZE, max_batch=max_batch)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number, got nan"):
        flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="guidance_scale must be a finite number or None, got inf"):
        flow.flow_model(cond, 2, SIZE, SIZE, guidance_scale=float("inf"))
    # A guidance weight without an unconditional branch would be ignored: the field is the conditional one.
    with pytest.raises(ValueError, match=r"cfg_scale=5.0 needs the unconditional branch"):
        flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=5.0)
    assert flow.flow_model(cond, 2, SIZE, SIZE, max_batch=1).fn(x, t).shape == x.shape
    # With the unconditional branch the weight is used.
    guided = gd.encode(flow, cfg=True, **random_embeds(1, DIM, negative=True))
    u1 = flow.flow_model(guided, 2, SIZE, SIZE, cfg_scale=1.0).fn(x, t)
    u5 = flow.flow_model(guided, 2, SIZE, SIZE, cfg_scale=5.0).fn(x, t)
    assert (u5 - u1).abs().max() > 1e-3


@pytest.mark.parametrize("layers", [[1], [-1], [], [0, 7]])
def test_skip_layer_guidance_layers_must_be_blocks_of_the_transformer(sd3, layers):
    """The SD3 transformer skips only indices it has: any other would leave the extra call unskipped and the
    guidance silently zero."""
    with pytest.raises(ValueError, match=r"skip_guidance_layers must be a non-empty list of block indices in 0\.\.0 "
                                         r"\(this SD3 transformer has 1 blocks\)"):
        gd.sample(sd3, guidance_scale=4.0, skip_guidance_layers=layers, **random_embeds(1, 16, negative=True), **FAST)


@pytest.mark.parametrize("name", ["skip_layer_guidance_start", "skip_layer_guidance_stop"])
def test_skip_layer_guidance_window_must_be_finite(sd3, name):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number .*got nan"):
        gd.sample(sd3, guidance_scale=4.0, skip_guidance_layers=[0], **{name: float("nan")},
                  **random_embeds(1, 16, negative=True), **FAST)
    # NumPy scalars are numbers.
    gd.sample(sd3, guidance_scale=4.0, skip_guidance_layers=[0], **{name: np.float64(0.5)},
              **random_embeds(1, 16, negative=True), **FAST)


# ------------------------------------------------------------------------------------------- states and latents
def test_states_of_another_layout_are_named(flux, sd3):
    flow = gd.as_flow(flux)
    with pytest.raises(ValueError, match=r"states of a 32 x 32 image must have shape \[N, 64, 16\] \(FLUX.1 state "
                                         r"layout\), got \(1, 60, 16\)"):
        flow.decode(torch.randn(1, 60, 16), SIZE, SIZE)
    with pytest.raises(ValueError, match=r"must have shape \[N, 64, 16\].*got \(1, 256, 16\)"):
        flow.unpack(torch.randn(1, 256, 16), SIZE, SIZE)
    with pytest.raises(ValueError, match=r"must have shape \[N, 4, 16, 16\] \(SD3 state layout\), got \(1, 4, 8, 8\)"):
        gd.as_flow(sd3).decode(torch.randn(1, 4, 8, 8), SIZE, SIZE)
    with pytest.raises(ValueError, match=r"VAE latents must have shape \[n, 4, h, w\], got \(4, 16, 16\)"):
        flow.to_state(torch.randn(4, 16, 16))
    x = torch.randn(2, 64, 16)   # the right layout still round-trips
    torch.testing.assert_close(flow.to_state(flow.to_vae(x, SIZE, SIZE)), x, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- rewards
def _tiny_clip():
    return CLIPScoreReward(*tiny_clip())


def test_clip_score_reward_refuses_a_bare_string_and_prompts_of_another_count():
    reward = _tiny_clip()
    images = torch.rand(2, 3, SIZE, SIZE)
    # A string would be read as one prompt per character: "ab" scored image 0 with "a" and image 1 with "b".
    with pytest.raises(TypeError, match="a list of one prompt per image, got 'ab'"):
        reward(images, "ab")
    with pytest.raises(TypeError, match="a list of one prompt per image, got 'a cat'"):
        reward(images[:1], "a cat")
    with pytest.raises(ValueError, match="one prompt per image: 2 images, got 1 prompts"):
        reward(images, ["a cat"])
    assert reward(images, ("a", "b")).shape == (2,)


def test_clip_score_reward_refuses_images_outside_the_unit_range_or_layout():
    reward = _tiny_clip()
    images = torch.rand(2, 3, SIZE, SIZE)
    for bad, lo in ((images * 255, "values in \\[0, 1\\], got values in \\[0"), (images * 2 - 1, "got values in \\[-")):
        with pytest.raises(ValueError, match=lo):
            reward(bad, ["a", "b"])
    with pytest.raises(ValueError, match=r"float images \[N, 3, H, W\] in \[0, 1\], got \(2, 32, 32, 3\)"):
        reward(images.permute(0, 2, 3, 1), ["a", "b"])
    # NaN images (a diverged particle) are scored NaN, which steering handles, not refused.
    nan = images.clone()
    nan[1] = float("nan")
    s = reward(nan, ["a", "b"])
    assert torch.isfinite(s[0]) and torch.isnan(s[1])


def test_latent_reward_checks_its_layout(flux):
    flow = gd.as_flow(flux)
    score = lambda im, p: im.mean((1, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match="prompts has 3 entries but num_prompts=2"):
        LatentReward(flow, score, ["a", "b", "c"], 2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="per_prompt must be an integer >= 1, got 0"):
        LatentReward(flow, score, None, 1, 0, SIZE, SIZE)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1 or None, got 0"):
        LatentReward(flow, score, None, 1, 2, SIZE, SIZE, max_batch=0)


# ------------------------------------------------------------------------------------------------ text encoders
def test_encode_hands_the_lora_scale_to_the_text_encoders(flux, sd3):
    """FluxPipeline and StableDiffusion3Pipeline scale text-encoder LoRA layers by joint_attention_kwargs["scale"]
    while they encode prompts (encode_prompt's lora_scale); ``encode`` hands it on, None by default."""
    seen = []

    def flux_encode(**kw):
        seen.append(kw.get("lora_scale", "missing"))
        n = len(kw["prompt"])
        return torch.randn(n, SEQ, DIM), torch.randn(n, DIM), None

    def sd3_encode(**kw):
        seen.append(kw.get("lora_scale", "missing"))
        n = len(kw["prompt"])
        return torch.randn(n, SEQ, DIM), torch.randn(n, SEQ, DIM), torch.randn(n, 16), torch.randn(n, 16)

    for parts, fake in ((flux, flux_encode), (sd3, sd3_encode)):
        pipe = types.SimpleNamespace(transformer=parts.transformer, scheduler=parts.scheduler, vae=parts.vae,
                                     text_encoder=object(), encode_prompt=fake)
        seen.clear()
        gd.encode(gd.as_flow(pipe), ["a", "b"], negative_prompt="c", cfg=True, lora_scale=0.5)
        assert seen and all(s == 0.5 for s in seen)
        seen.clear()
        gd.encode(gd.as_flow(pipe), ["a", "b"])
        assert seen == [None]


def test_sample_hands_the_attention_scale_to_the_text_encoders(flux):
    """sample(joint_attention_kwargs={"scale": s}) scales text-encoder LoRA layers as the pipelines do."""
    seen = []

    def flux_encode(**kw):
        seen.append(kw.get("lora_scale", "missing"))
        n = len(kw["prompt"])
        return torch.randn(n, SEQ, DIM), torch.randn(n, DIM), None

    pipe = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=flux.vae,
                                 text_encoder=object(), encode_prompt=flux_encode)
    gd.sample(pipe, ["a"], joint_attention_kwargs={"scale": 0.5}, **FAST)
    assert seen == [0.5]
    seen.clear()
    gd.sample(pipe, ["a"], **FAST)
    assert seen == [None]


def test_true_cfg_without_a_negative_prompt_is_refused(flux):
    """FluxPipeline runs unguided (a log line) when true_cfg_scale > 1 comes without a negative prompt."""
    with pytest.raises(ValueError, match=r"true_cfg_scale=4.0 needs a negative prompt"):
        gd.sample(flux, true_cfg_scale=4.0, **random_embeds(1, DIM), **FAST)
    gd.sample(flux, true_cfg_scale=4.0, **random_embeds(1, DIM, negative=True), **FAST)


# ------------------------------------------------------------------------------------------------- FLUX.2 ids
def test_flux2_position_ids_stay_exact_under_a_bfloat16_transformer():
    """The FLUX.2 pipelines give the transformer integer position ids (int64); FLUX.2 encodes prompts to 512
    tokens, and in bfloat16 the token indices above 256 would round (257 -> 256), moving the text tokens' rotary
    positions. The ids reach the transformer exact whatever its dtype."""
    from diffusers_parts import tiny_flux2
    parts = tiny_flux2()
    parts.transformer.to(torch.bfloat16)
    flow = gd.as_flow(parts)
    tokens = 300
    cond = gd.encode(flow, prompt_embeds=torch.randn(1, tokens, DIM))
    seen = {}

    def grab(module, args, kwargs):
        seen.update(txt=kwargs["txt_ids"], img=kwargs["img_ids"])

    handle = parts.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        flow.flow_model(cond, 1, SIZE, SIZE).fn(torch.randn(1, 64, 16, dtype=torch.bfloat16), torch.full((1,), 0.5))
    finally:
        handle.remove()
    assert torch.equal(seen["txt"][:, 3].double(), torch.arange(tokens, dtype=torch.float64))
    rows = torch.arange(8).repeat_interleave(8)
    assert torch.equal(seen["img"][:, 1].double(), rows.double())


def test_skip_layer_indices_may_be_numpy_integers(sd3):
    kw = dict(guidance_scale=4.0, latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)),
              **random_embeds(1, 16, negative=True), **FAST)
    as_numpy = gd.sample(sd3, skip_guidance_layers=np.array([0]), **kw)
    torch.testing.assert_close(as_numpy, gd.sample(sd3, skip_guidance_layers=[0], **kw), atol=0, rtol=0)
    for bad in (3.5, "0", [0.5]):
        with pytest.raises(ValueError, match="skip_guidance_layers must be a list of block indices"):
            gd.sample(sd3, skip_guidance_layers=bad, **kw)
