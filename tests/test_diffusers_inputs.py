"""Bad or awkward arguments to the diffusers integration's ``sample`` and ``steer``: each is refused before any
transformer call with an error naming the argument, its value and what is allowed, and none runs silently
wrong. Arguments the diffusers pipelines accept (a negative guidance weight, integer latents) keep working."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import (DIM, SEQ, SIZE, flux2_embeds, pipeline, random_embeds,  # noqa: E402
                             tiny_flux_controlnet)

FAST = dict(method="ode", transitions=2, inner_steps=1, height=SIZE, width=SIZE, output_type="latent")


def _mean_reward(images, prompts):
    return images.mean((1, 2, 3))


def _sd3_embeds(prompts: int = 2) -> dict:
    return random_embeds(prompts, 16, negative=True)


# ------------------------------------------------------------------------------------------------ prompt embeddings
def test_negative_embeddings_of_another_shape_are_named(sd3, flux):
    emb = random_embeds(2, 16)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds has shape \(2, 10, 32\) but prompt_embeds "
                                         r"\(2, 7, 32\): classifier-free guidance"):
        gd.sample(sd3, negative_prompt_embeds=torch.randn(2, SEQ + 3, DIM),
                  negative_pooled_prompt_embeds=torch.randn(2, 16), **emb, **FAST)
    with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds has shape \(2, 12\) but "
                                         r"pooled_prompt_embeds \(2, 16\)"):
        gd.sample(sd3, negative_prompt_embeds=torch.randn(2, SEQ, DIM),
                  negative_pooled_prompt_embeds=torch.randn(2, 12), **emb, **FAST)
    # FLUX.1's true CFG batches both branches as well.
    with pytest.raises(ValueError, match=r"negative_prompt_embeds has shape \(2, 5, 32\) but prompt_embeds"):
        gd.sample(flux, negative_prompt_embeds=torch.randn(2, 5, DIM),
                  negative_pooled_prompt_embeds=torch.randn(2, DIM), true_cfg_scale=2.0, **random_embeds(2, DIM),
                  **FAST)
    with pytest.raises(ValueError, match="negative_prompt_embeds has 1 rows but there are 2 prompts"):
        gd.sample(sd3, negative_prompt_embeds=torch.randn(1, SEQ, DIM),
                  negative_pooled_prompt_embeds=torch.randn(1, 16), **emb, **FAST)


def test_embedding_widths_must_be_the_transformers(flux, sd3, flux2):
    with pytest.raises(ValueError, match=r"prompt_embeds has width 34 \(shape \(2, 7, 34\)\) but the transformer "
                                         r"reads 32 \(joint_attention_dim in its config\)"):
        gd.sample(flux, prompt_embeds=torch.randn(2, SEQ, DIM + 2), pooled_prompt_embeds=torch.randn(2, DIM), **FAST)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds has width 32 \(shape \(2, 32\)\) but the transformer "
                                         r"reads 16 \(pooled_projection_dim"):
        gd.sample(sd3, **random_embeds(2, DIM), guidance_scale=1.0, **FAST)
    with pytest.raises(ValueError, match=r"prompt_embeds has width 33 .* reads 32 \(joint_attention_dim"):
        gd.sample(flux2, prompt_embeds=torch.randn(1, SEQ, DIM + 1), **FAST)


def test_empty_or_non_finite_embeddings_are_refused(flux, sd3):
    with pytest.raises(ValueError, match=r"prompt_embeds must hold at least one prompt's row, got shape \(0, 7, 32\)"):
        gd.sample(flux, prompt_embeds=torch.randn(0, SEQ, DIM), pooled_prompt_embeds=torch.randn(0, DIM), **FAST)
    emb = random_embeds(2, DIM)
    emb["prompt_embeds"][1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="prompt_embeds holds NaN or Inf values"):
        gd.sample(flux, **emb, **FAST)
    emb = _sd3_embeds()
    emb["negative_pooled_prompt_embeds"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds holds NaN or Inf values"):
        gd.sample(sd3, **emb, **FAST)


def test_text_prompts_that_embeddings_would_leave_unread_are_refused(flux, sd3, klein):
    with pytest.raises(ValueError, match="prompt_2 would be ignored: prompt_embeds is given"):
        gd.sample(flux, ["a", "b"], prompt_2=["x", "y", "z"], **random_embeds(2, DIM), **FAST)
    with pytest.raises(ValueError, match="negative_prompt, negative_prompt_3 would be ignored: "
                                         "negative_prompt_embeds is given"):
        gd.sample(sd3, negative_prompt="blurry", negative_prompt_3="dark", **_sd3_embeds(), **FAST)
    with pytest.raises(ValueError, match="negative_prompt would be ignored: negative_prompt_embeds is given"):
        gd.sample(klein, negative_prompt="blurry", **flux2_embeds(1, negative=True), **FAST)


# ------------------------------------------------------------------------------------------------- guidance weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "3", True])
def test_guidance_scale_must_be_a_finite_number(flux, sd3, klein, value):
    # A NaN compared False with 1 and switched SD3's and Klein's classifier-free guidance off without a word.
    for parts, emb in ((sd3, _sd3_embeds()), (flux, random_embeds(2, DIM)), (klein, flux2_embeds(2, negative=True))):
        with pytest.raises(ValueError, match=f"guidance_scale must be a finite number or None, got {value!r}"):
            gd.sample(parts, guidance_scale=value, **emb, **FAST)
    with pytest.raises(ValueError, match=f"true_cfg_scale must be a finite number, got {value!r}"):
        gd.sample(flux, true_cfg_scale=value, **random_embeds(2, DIM, negative=True), **FAST)


def test_true_cfg_scale_none_is_named(flux):
    with pytest.raises(ValueError, match="true_cfg_scale must be a finite number, got None"):
        gd.sample(flux, true_cfg_scale=None, **random_embeds(2, DIM), **FAST)


def test_a_guidance_weight_at_or_below_one_turns_guidance_off_as_in_the_pipelines(sd3):
    emb, lat = _sd3_embeds(), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    off = gd.sample(sd3, guidance_scale=1.0, latents=lat, **emb, **FAST)
    negative = gd.sample(sd3, guidance_scale=-1.0, latents=lat, **emb, **FAST)
    guided = gd.sample(sd3, guidance_scale=4.0, latents=lat, **emb, **FAST)
    torch.testing.assert_close(negative, off, atol=0, rtol=0)
    assert (guided - off).abs().max() > 1e-3


def test_skip_layer_guidance_scale_must_be_finite(sd3):
    with pytest.raises(ValueError, match="skip_layer_guidance_scale must be a finite number, got nan"):
        gd.sample(sd3, skip_guidance_layers=[0], skip_layer_guidance_scale=float("nan"), **_sd3_embeds(), **FAST)


def test_controlnet_conditioning_scale_must_be_finite(flux):
    pipe = pipeline(flux, "FluxControlNetPipeline", controlnet=tiny_flux_controlnet())
    image = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be a number and finite .*got nan"):
        gd.sample(pipe, control_image=image, controlnet_conditioning_scale=float("nan"), **random_embeds(1, DIM),
                  **FAST)


# ------------------------------------------------------------------------------------------ generators and latents
@pytest.mark.parametrize("call", ["sample", "steer"])
def test_generator_must_be_one_generator(flux, call):
    def run(generator):
        if call == "sample":
            return gd.sample(flux, generator=generator, **random_embeds(2, DIM), **FAST)
        return gd.steer(flux, None, _mean_reward, particles=2, generator=generator, **random_embeds(2, DIM), **FAST)

    with pytest.raises(TypeError, match="generator must be one torch.Generator or None, got a list of 2: a single "
                                        "generator draws every row's starting noise"):
        run([torch.Generator().manual_seed(i) for i in range(2)])
    with pytest.raises(TypeError, match="got a list of 1"):
        run([torch.Generator().manual_seed(0)])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        run(0)


def test_generator_on_another_device_than_the_pipeline_is_named(flux):
    # The pipeline's execution device decides where the noise is drawn (checked before anything runs there).
    pipe = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=flux.vae,
                                 _execution_device="cuda:0")
    with pytest.raises(ValueError, match=r"generator is on cpu but the pipeline runs on cuda:0: create it with "
                                         r"torch.Generator\(device='cuda:0'\)"):
        gd.sample(pipe, generator=torch.Generator().manual_seed(0), **random_embeds(2, DIM), **FAST)


def test_complex_latents_are_refused_and_integer_ones_cast_as_in_the_pipelines(flux):
    emb = random_embeds(2, DIM)
    with pytest.raises(TypeError, match="latents must be a real Tensor, got torch.complex64"):
        gd.sample(flux, latents=torch.randn(2, 64, 16, dtype=torch.complex64), **emb, **FAST)
    with pytest.raises(TypeError, match="latents must be a real Tensor, got torch.complex64"):
        gd.steer(flux, None, _mean_reward, particles=2, latents=torch.randn(2, 2, 64, 16, dtype=torch.complex64),
                 **emb, **FAST)
    ints = torch.randint(-2, 3, (2, 64, 16))
    torch.testing.assert_close(gd.sample(flux, latents=ints, **emb, **FAST),
                               gd.sample(flux, latents=ints.float(), **emb, **FAST), atol=0, rtol=0)


def test_image_with_nan_is_refused(flux):
    image = torch.rand(1, 3, SIZE, SIZE)
    image[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="image holds NaN or Inf values"):
        gd.sample(flux, image=image, **random_embeds(2, DIM), **FAST)


def test_conditions_with_nan_are_named(flux_fill, flux_control):
    emb, image = random_embeds(2, DIM), torch.rand(1, 3, SIZE, SIZE)
    mask = torch.ones(1, 1, SIZE, SIZE)
    mask[0, 0, :4] = float("nan")
    with pytest.raises(ValueError, match="mask_image holds NaN or Inf values"):
        gd.sample(flux_fill, image=image, mask_image=mask, **emb, **FAST)
    with pytest.raises(ValueError, match="masked_image_latents holds NaN or Inf values"):
        gd.sample(flux_fill, masked_image_latents=torch.full((1, 64, 32), float("nan")), **emb, **FAST)
    control = image.clone()
    control[0, 2, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="control_image holds NaN or Inf values"):
        gd.sample(flux_control, control_image=control, **emb, **FAST)
    with pytest.raises(ValueError, match="control_image holds NaN or Inf values"):
        gd.sample(flux_control, control_image=torch.full((1, 64, 16), float("nan")), **emb, **FAST)


def test_image_prompt_embeddings_with_nan_are_named():
    from glass_fast.integrations.diffusers_conditioning import image_prompts
    # A FLUX.1 transformer with one IP-Adapter loaded, as far as image_prompts reads it.
    flow = types.SimpleNamespace(kind="flux", device=torch.device("cpu"), dtype=torch.float32, pipeline=None,
                                 transformer=types.SimpleNamespace(encoder_hid_proj=types.SimpleNamespace(
                                     num_ip_adapters=1)))
    embeds = torch.randn(1, 1, 12)
    assert image_prompts(flow, 2, False, SIZE, SIZE, ip_adapter_image_embeds=embeds)[0][0].shape == (2, 1, 12)
    embeds[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="ip_adapter_image_embeds holds NaN or Inf values"):
        image_prompts(flow, 2, False, SIZE, SIZE, ip_adapter_image_embeds=embeds)


@pytest.mark.parametrize("sigmas", [[0.2, 0.5, 1.0], [2.0, 1.0, 0.5], [1.0, 0.5, -0.5], [1.0, 0.5, 0.0],
                                    [1.0, 0.5, 0.5]])
def test_sigmas_must_decrease_inside_the_unit_interval(flux, sigmas):
    kw = {k: v for k, v in FAST.items() if k != "transitions"}
    with pytest.raises(ValueError, match=r"sigmas must be a 1-D sequence of finite noise levels, strictly "
                                         r"decreasing in \(0, 1\] \(the final 0 is appended\), got "
                                         + str(sigmas).replace("[", r"\[").replace("]", r"\]")):
        gd.sample(flux, sigmas=sigmas, **random_embeds(2, DIM), **kw)


# --------------------------------------------------------------------------------------------------- steering
def test_reward_with_complex_scores_is_refused(flux):
    def complex_reward(images, prompts):
        return torch.ones(images.shape[0], dtype=torch.complex64)

    with pytest.raises(TypeError, match="reward must return real scores, got a Tensor of torch.complex64"):
        gd.steer(flux, None, complex_reward, particles=2, **random_embeds(2, DIM), **FAST)


@pytest.mark.parametrize("algorithm, key, why", [
    ("fk", "foo", "no such option"),
    ("fk", "num_images_per_prompt", "no such option"),
    ("fk", "expansions", "it is an option of algorithm='beam'"),
    ("beam", "resample_window", "it is an option of algorithm='fk'"),
    ("fk", "model", "steer sets it from its own arguments"),
])
def test_unknown_steering_options_are_named_with_the_allowed_ones(flux, algorithm, key, why):
    with pytest.raises(TypeError, match=rf"steer got the steering option '{key}', which algorithm='{algorithm}' "
                                        rf"does not take \({why}\); its options are .*grid"):
        gd.steer(flux, None, _mean_reward, particles=2, algorithm=algorithm, **{key: 1}, **random_embeds(1, DIM),
                 **FAST)


def test_feynman_kac_arguments_are_refused_with_beam_search(flux):
    with pytest.raises(ValueError, match=r"lmbda=3.0, resample='multinomial': Feynman-Kac steering's arguments, "
                                         r"which algorithm='beam' does not use"):
        gd.steer(flux, None, _mean_reward, particles=2, algorithm="beam", lmbda=3.0, resample="multinomial",
                 **random_embeds(1, DIM), **FAST)


def test_allowed_steering_options_still_reach_the_algorithm(flux):
    kw = dict(particles=2, **random_embeds(1, DIM), **{**FAST, "method": "glass"})
    # Beam search scores every child: expansions per particle per transition (2 transitions).
    calls = [gd.steer(flux, None, _mean_reward, algorithm="beam", expansions=e, **kw)[1].reward_calls for e in (2, 3)]
    assert calls == [4.0, 6.0]
    # The value potential's posterior draws: value_samples more reward rows per particle per transition.
    calls = [gd.steer(flux, None, _mean_reward, potential="value", value_samples=v, **kw)[1].reward_calls
             for v in (2, 4)]
    assert calls[1] > calls[0]


def test_an_output_that_needs_the_missing_vae_is_refused_before_sampling(flux):
    novae = types.SimpleNamespace(transformer=flux.transformer, scheduler=flux.scheduler, vae=None)
    calls = []
    kw = dict(**random_embeds(2, DIM), **{**FAST, "output_type": "pt"})
    with pytest.raises(ValueError, match="output_type='pt' decodes the images through the pipeline's VAE, and it "
                                         "has none"):
        gd.sample(novae, callback=lambda *a: calls.append(1), **kw)
    assert calls == []
    assert gd.sample(novae, **{**kw, "output_type": "latent"}).shape[0] == 2


def test_a_subclass_of_a_pipeline_is_read_as_that_pipeline(flux):
    """A user's subclass of FluxKontextPipeline keeps image= as Kontext's reference (not an image-to-image
    start), and a subclass of FluxKontextInpaintPipeline is read as Kontext inpainting (image= is the image to
    edit, and it needs a mask)."""
    import diffusers

    from glass_fast.integrations.diffusers_flux import kontext_image

    class MyKontext(diffusers.FluxKontextPipeline):
        pass

    class MyInpaint(diffusers.FluxKontextInpaintPipeline):
        pass

    base = pipeline(flux, "FluxKontextPipeline")
    mine = MyKontext(transformer=flux.transformer, scheduler=flux.scheduler, vae=flux.vae, text_encoder=None,
                     tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    ref = object()
    assert kontext_image(base, ref, None, None) == (None, ref)
    assert kontext_image(mine, ref, None, None) == (None, ref)
    inpaint = MyInpaint(transformer=flux.transformer, scheduler=flux.scheduler, vae=flux.vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    assert kontext_image(inpaint, ref, None, None) == (ref, None)
    with pytest.raises(ValueError, match="inpainting needs image=.*missing: image, mask_image"):
        gd.sample(inpaint, height=32, width=32, **random_embeds(1, DIM))


def test_numpy_scalars_are_numbers_everywhere(sd3):
    """A NumPy scale is accepted like a float (guidance_scale already was), giving the same images."""
    kw = dict(height=SIZE, width=SIZE, transitions=2, inner_steps=1, method="ode", output_type="latent",
              skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
              latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)),
              **random_embeds(1, 16, negative=True))
    as_numpy = gd.sample(sd3, guidance_scale=np.float32(4.0), skip_layer_guidance_scale=np.float32(2.5), **kw)
    as_float = gd.sample(sd3, guidance_scale=4.0, skip_layer_guidance_scale=2.5, **kw)
    torch.testing.assert_close(as_numpy, as_float, atol=0, rtol=0)
