"""FLUX.2 ([dev]: Flux2Pipeline, and Klein: Flux2KleinPipeline) through the diffusers integration, on tiny
randomly initialised transformers and VAEs built from configs (nothing is downloaded).

The cross-check: glass_fast's ODE with one Euler step per transition against diffusers' own pipeline
objects driving the same parts, from the same generator seed, with several prompts and images per prompt.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from glass_fast.integrations import diffusers as gd  # noqa: E402
from diffusers_parts import (ATOL, DIM, SEQ, SIZE, flux2_embeds, flux2_pipeline, random_embeds,  # noqa: E402
                             tiny_vae)

H2 = SIZE // 4   # packed tokens per side: the tiny VAE halves the image, patches halve it again


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


# ------------------------------------------------------------------------------------------- the adapter
def test_noise_layout_and_normalisation_are_the_pipelines(flux2):
    pytest.importorskip("transformers")
    from diffusers import Flux2Pipeline
    flow = gd.as_flow(flux2)
    assert flow.kind == "flux2" and flow.state_shape(SIZE, SIZE) == (H2 * H2, 16)
    # Noise: drawn as the pipeline draws it (patchified [N, 4C, h/2, w/2]) and listed token by token.
    drawn = torch.randn(3, 16, H2, H2, generator=_seed(1))
    torch.testing.assert_close(flow.noise(3, SIZE, SIZE, _seed(1)), Flux2Pipeline._pack_latents(drawn),
                               atol=0, rtol=0)
    # VAE latents -> states: the pipeline's patchify, batch-norm standardisation and packing.
    lat = torch.randn(3, 4, 2 * H2, 2 * H2, generator=_seed(2))
    bn = flux2.vae.bn
    std = torch.sqrt(bn.running_var + flux2.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    want = Flux2Pipeline._pack_latents((Flux2Pipeline._patchify_latents(lat) - bn.running_mean.view(1, -1, 1, 1))
                                       / std)
    state = flow.to_state(lat)
    torch.testing.assert_close(state, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flow.to_vae(state, SIZE, SIZE), lat, atol=1e-5, rtol=1e-5)
    assert (flow.to_state(lat) - flow.pack(lat)).abs().max() > 0.1      # the statistics are not the identity


@pytest.mark.parametrize("size,steps", [((SIZE, SIZE), 4), ((SIZE, 2 * SIZE), 7), ((6 * SIZE, 6 * SIZE), 28)])
def test_sigma_schedule_is_flux2s_empirical_shift(flux2, size, steps):
    pytest.importorskip("transformers")
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    flow = gd.as_flow(flux2)
    tokens = (size[0] // 4) * (size[1] // 4)
    sched = FlowMatchEulerDiscreteScheduler.from_config(flux2.scheduler.config)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                        mu=compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
    torch.testing.assert_close(flow.time_grid(steps, *size), 1 - sched.sigmas.double(), atol=0, rtol=0)
    # FLUX.2's shift depends on the step count, FLUX.1's does not.
    other = flow.time_grid(steps + 10, *size)
    sched.set_timesteps(steps + 10, sigmas=np.linspace(1.0, 1 / (steps + 10), steps + 10),
                        mu=compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
    assert (other - (1 - sched.sigmas.double())).abs().max() > 1e-4


def test_velocity_is_the_sign_flipped_transformer_with_flux2_ids(flux2):
    flow = gd.as_flow(flux2)
    cond = gd.encode(flow, **flux2_embeds(2, seed=3))
    model = flow.flow_model(cond, 3, SIZE, SIZE, guidance_scale=2.5)
    x, t = torch.randn(6, H2 * H2, 16, generator=_seed(4)), torch.rand(6, generator=_seed(5))
    rows = torch.arange(6) // 3
    # The pipeline's ids: image tokens (0, row, column, 0), text tokens (0, 0, 0, index).
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(H2), torch.arange(H2), torch.arange(1)).float()
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(SEQ)).float()
    with torch.no_grad():
        raw = flux2.transformer(hidden_states=x, timestep=1 - t, guidance=torch.full((6,), 2.5),
                                encoder_hidden_states=cond.prompt_embeds[rows], img_ids=img_ids, txt_ids=txt_ids,
                                return_dict=False)[0]
        u, d = model.velocity(x, t), model.denoise(x, t)
    torch.testing.assert_close(u, -raw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d, x - (1 - t)[:, None, None] * raw, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------- the pipelines themselves
@pytest.mark.parametrize("guidance_scale", [None, 1.0, 2.5])
def test_ode_reproduces_flux2_pipeline(flux2, guidance_scale):
    pipe = flux2_pipeline(flux2, "Flux2Pipeline")
    emb = flux2_embeds(2, seed=6)
    g = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    kw = dict(num_images_per_prompt=2, height=SIZE, width=SIZE, **g, **emb)
    theirs = pipe(num_inference_steps=4, generator=_seed(7), output_type="latent", **kw).images
    ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_seed(7), output_type="latent",
                     **kw)
    assert ours.shape == theirs.shape == (4, H2 * H2, 16)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # Decoding too: unpacking, the batch-norm statistics, unpatchifying, the VAE and the [0, 1] range.
    img_theirs = pipe(num_inference_steps=4, generator=_seed(7), output_type="pt", **kw).images
    img_ours = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_seed(7), output_type="pt",
                         max_batch=3, **kw)
    torch.testing.assert_close(img_ours, img_theirs, atol=ATOL, rtol=0)
    if guidance_scale == 2.5:     # the guidance embedding changes the field
        default = gd.sample(pipe, method="ode", transitions=4, inner_steps=1, generator=_seed(7),
                            output_type="latent", **{**kw, "guidance_scale": 4.0})
        assert (ours - default).abs().max() > 100 * ATOL


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_ode_reproduces_flux2_klein_pipeline(klein, guidance_scale):
    pipe = flux2_pipeline(klein, "Flux2KleinPipeline")
    emb = flux2_embeds(2, seed=8, negative=True)
    kw = dict(num_images_per_prompt=3, height=SIZE, width=SIZE, guidance_scale=guidance_scale, **emb)
    theirs = pipe(num_inference_steps=3, generator=_seed(9), output_type="latent", **kw).images
    ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_seed(9), output_type="latent",
                     max_batch=4, **kw)
    # Klein's "latent" output is the VAE's latents (statistics undone, unpatchified).
    flow = gd.as_flow(pipe)
    assert theirs.shape == (6, 4, 2 * H2, 2 * H2) and ours.shape == (6, H2 * H2, 16)
    torch.testing.assert_close(flow.to_vae(ours, SIZE, SIZE), theirs, atol=ATOL, rtol=0)
    img_theirs = pipe(num_inference_steps=3, generator=_seed(9), output_type="pt", **kw).images
    img_ours = gd.postprocess(flow, ours, SIZE, SIZE, "pt")
    torch.testing.assert_close(img_ours, img_theirs, atol=ATOL, rtol=0)
    if guidance_scale > 1:     # true CFG ran: the negative branch changed the field
        plain = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_seed(9),
                          output_type="latent", **{**kw, "guidance_scale": 1.0})
        assert (plain - ours).abs().max() > 100 * ATOL


def test_distilled_klein_runs_unguided_as_its_pipeline(klein):
    pipe = flux2_pipeline(klein, "Flux2KleinPipeline", is_distilled=True)
    emb = flux2_embeds(2, seed=10)
    kw = dict(height=SIZE, width=SIZE, num_images_per_prompt=2, **emb)
    theirs = pipe(num_inference_steps=2, generator=_seed(11), output_type="latent", **kw).images
    ours = gd.sample(pipe, method="ode", transitions=2, inner_steps=1, generator=_seed(11), output_type="latent",
                     **kw)
    torch.testing.assert_close(gd.as_flow(pipe).to_vae(ours, SIZE, SIZE), theirs, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"guidance_scale=3.0: this FLUX.2 Klein pipeline is step-wise distilled"):
        gd.sample(pipe, guidance_scale=3.0, **kw)


def test_custom_sigmas_reproduce_the_pipeline(flux2):
    pipe = flux2_pipeline(flux2, "Flux2Pipeline")
    emb = flux2_embeds(1, seed=12)
    sigmas = [1.0, 0.8, 0.45, 0.2]
    kw = dict(height=SIZE, width=SIZE, output_type="latent", **emb)
    # The shift is computed for len(sigmas) steps: the pipeline with num_inference_steps=len(sigmas).
    theirs = pipe(num_inference_steps=len(sigmas), sigmas=sigmas, generator=_seed(13), **kw).images
    ours = gd.sample(pipe, method="ode", inner_steps=1, sigmas=sigmas, generator=_seed(13), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_joint_attention_kwargs_reach_every_call_as_in_the_pipeline(flux2):
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

    def scaled(base):
        class Scaled(base):
            """The default attention with its output scaled by a joint_attention_kwargs entry."""

            def __call__(self, *args, out_scale=1.0, **kwargs):
                out = super().__call__(*args, **kwargs)
                return tuple(o * out_scale for o in out) if isinstance(out, tuple) else out * out_scale
        return Scaled()

    pipe = flux2_pipeline(flux2, "Flux2Pipeline")
    default = flux2.transformer.attn_processors
    procs = {name: scaled(Flux2ParallelSelfAttnProcessor if "single" in name else Flux2AttnProcessor)
             for name in default}
    flux2.transformer.set_attn_processor(procs)
    try:
        kw = dict(height=SIZE, width=SIZE, output_type="latent", **flux2_embeds(1, seed=14))
        theirs = pipe(num_inference_steps=3, generator=_seed(15), attention_kwargs={"out_scale": 0.3}, **kw).images
        ours = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_seed(15),
                         joint_attention_kwargs={"out_scale": 0.3}, **kw)
        unscaled = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_seed(15), **kw)
    finally:
        flux2.transformer.set_attn_processor(default)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - unscaled).abs().max() > 100 * ATOL


def test_true_cfg_on_flux2_dev_is_the_guided_field_of_one_stacked_call(flux2):
    emb = flux2_embeds(1, seed=16, negative=True)
    flow = gd.as_flow(flux2)
    lat = flow.noise(2, SIZE, SIZE, _seed(17))
    kw = dict(method="ode", transitions=2, inner_steps=1, num_images_per_prompt=2, height=SIZE, width=SIZE,
              latents=lat, output_type="latent", guidance_scale=2.0)
    guided = gd.sample(flux2, true_cfg_scale=3.0, **kw, **emb)
    cond = gd.encode(flow, **flux2_embeds(1, seed=16))
    neg = gd.encode(flow, prompt_embeds=emb["negative_prompt_embeds"])
    x, sigmas = lat.clone(), flow.sigmas(2, SIZE, SIZE)
    rows = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            pos = flow.predict(x, s0.expand(2), cond.prompt_embeds[rows], None, SIZE, SIZE, 2.0)
            unc = flow.predict(x, s0.expand(2), neg.prompt_embeds[rows], None, SIZE, SIZE, 2.0)
            x = x + (s1 - s0) * (unc + 3.0 * (pos - unc))
    torch.testing.assert_close(guided, x, atol=ATOL, rtol=0)


def test_flux2_dev_prompts_through_its_encode_prompt_match_the_pipeline(flux2):
    pytest.importorskip("transformers")
    from diffusers import Flux2Pipeline
    class Table(torch.nn.Embedding):
        """An embedding table with the device and dtype attributes pipelines read from their text encoders."""
        device = property(lambda self: self.weight.device)
        dtype = property(lambda self: self.weight.dtype)

    torch.manual_seed(37)
    table = Table(256, DIM)

    class BytePrompts(Flux2Pipeline):
        """Flux2Pipeline with a stand-in for its Mistral text encoder: a table lookup of the prompts' bytes,
        padded to max_sequence_length (its own encode_prompt runs around it)."""

        @staticmethod
        def _get_mistral_3_small_prompt_embeds(text_encoder, tokenizer, prompt, dtype=None, device=None,
                                               max_sequence_length=512, system_message=None,
                                               hidden_states_layers=(10, 20, 30)):
            ids = [list(p.encode())[:max_sequence_length] for p in ([prompt] if isinstance(prompt, str) else prompt)]
            ids = torch.tensor([i + [0] * (max_sequence_length - len(i)) for i in ids])
            return text_encoder((ids + sum(hidden_states_layers)) % 256)

    pipe = BytePrompts(scheduler=flux2.scheduler, vae=flux2.vae, text_encoder=table, tokenizer=None,
                       transformer=flux2.transformer)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a dog"]
    kw = dict(num_images_per_prompt=2, height=SIZE, width=SIZE, max_sequence_length=6, guidance_scale=3.0,
              output_type="latent")
    theirs = pipe(prompt=prompts, num_inference_steps=3, generator=_seed(38), **kw).images
    ours = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, generator=_seed(38), **kw)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # text_encoder_out_layers reaches the encoder (here: it shifts the stand-in's token ids).
    scaled = pipe(prompt=prompts, num_inference_steps=3, generator=_seed(38), text_encoder_out_layers=(1,), **kw).images
    ours_scaled = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, generator=_seed(38),
                            text_encoder_out_layers=(1,), **kw)
    torch.testing.assert_close(ours_scaled, scaled, atol=ATOL, rtol=0)
    assert (ours_scaled - ours).abs().max() > 100 * ATOL


def _word_tokenizer(transformers, max_length: int):
    """A fast tokenizer over a tiny word vocabulary with a chat template (built in memory, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "a", "cat", "dog", "red", "on", "mat", "<user>", "<assistant>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                               model_max_length=max_length)
    out.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return out


def test_klein_prompts_through_its_text_encoder_match_the_pipeline(klein):
    transformers = pytest.importorskip("transformers")
    from diffusers import Flux2KleinPipeline
    torch.manual_seed(18)
    # Two hidden layers of width 16, stacked: the transformer's 32-wide text tokens.
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32)).eval()
    pipe = Flux2KleinPipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=qwen,
                              tokenizer=_word_tokenizer(transformers, 8), transformer=klein.transformer)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a dog on a mat"]
    kw = dict(num_images_per_prompt=2, height=SIZE, width=SIZE, max_sequence_length=8, guidance_scale=2.0,
              text_encoder_out_layers=(1, 2))
    flow = gd.as_flow(pipe)
    # Guided with the pipeline's negative prompt "", encoded like the prompts.
    theirs = pipe(prompt=prompts, num_inference_steps=3, generator=_seed(19), output_type="latent", **kw).images
    ours = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, generator=_seed(19),
                     output_type="latent", **kw)
    torch.testing.assert_close(flow.to_vae(ours, SIZE, SIZE), theirs, atol=ATOL, rtol=0)
    # Other layers give other embeddings, and a negative prompt (beyond the pipeline) changes the field.
    other = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, generator=_seed(19),
                      output_type="latent", **{**kw, "text_encoder_out_layers": (2, 1)})
    negated = gd.sample(pipe, prompts, method="ode", transitions=3, inner_steps=1, generator=_seed(19),
                        output_type="latent", negative_prompt="a dog", **kw)
    assert (other - ours).abs().max() > 100 * ATOL and (negated - ours).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but there are 2 prompts"):
        gd.sample(pipe, prompts, negative_prompt=["a", "b", "c"], **kw)


def _references():
    """Two random RGB reference images of different sizes (the pipelines take PIL images of 64 px or more)."""
    from PIL import Image
    rng = np.random.default_rng(30)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 80), (72, 64))]


@pytest.mark.parametrize("cls", ["Flux2Pipeline", "Flux2KleinPipeline"])
def test_reference_images_reproduce_the_pipelines(flux2, klein, cls):
    parts, extra = (flux2, {}) if cls == "Flux2Pipeline" else (klein, {"guidance_scale": 3.0})
    pipe = flux2_pipeline(parts, cls)
    flow = gd.as_flow(pipe)
    emb = flux2_embeds(2, seed=31, negative=cls != "Flux2Pipeline")
    refs = _references()
    # One reference: the output takes its size (64 x 80); two: the size given, each image with its own ids.
    for image, size in ((refs[0], {}), (refs, {"height": SIZE, "width": SIZE})):
        kw = dict(num_images_per_prompt=2, **size, **extra, **emb)
        theirs = pipe(image=image, num_inference_steps=3, generator=_seed(32), output_type="pt", **kw).images
        ours = gd.sample(pipe, image=image, method="ode", transitions=3, inner_steps=1, generator=_seed(32),
                         output_type="latent", **kw)
        h, w = theirs.shape[2:]
        assert (h, w) == ((64, 80) if not size else (SIZE, SIZE))
        torch.testing.assert_close(gd.postprocess(flow, ours, h, w, "pt"), theirs, atol=ATOL, rtol=0)
        if not size:
            continue
        # The references joined every call (context_image= is the same argument).
        plain = gd.sample(pipe, method="ode", transitions=3, inner_steps=1, generator=_seed(32), output_type="latent",
                          **{**kw, "height": h, "width": w})
        assert (plain - ours).abs().max() > 100 * ATOL
        same = gd.sample(pipe, context_image=image, method="ode", transitions=3, inner_steps=1, generator=_seed(32),
                         output_type="latent", **kw)
        torch.testing.assert_close(same, ours, atol=0, rtol=0)


@pytest.fixture(scope="module")
def klein_kv():
    """Flux2KleinKVPipeline around its own tiny Klein parts (the pipeline swaps its transformer's attention
    processors for cache-aware ones)."""
    from diffusers_parts import tiny_flux2
    return flux2_pipeline(tiny_flux2(guidance_embeds=False), "Flux2KleinKVPipeline")


def test_klein_kv_pipeline_reproduced_with_cached_reference_keys_and_values(klein_kv):
    """The reference images' keys and values, computed once, give every call what the pipeline's first-step
    extraction and later cached calls give; without references the pipeline is plain (unguided) Klein."""
    pipe, flow = klein_kv, gd.as_flow(klein_kv)
    emb = flux2_embeds(2, seed=40)
    refs = _references()
    for image, size in ((refs[0], {}), (refs, {"height": SIZE, "width": SIZE}), (None, {"height": SIZE,
                                                                                        "width": SIZE})):
        kw = dict(num_images_per_prompt=2, **size, **emb)
        theirs = pipe(image=image, num_inference_steps=3, generator=_seed(41), output_type="pt", **kw).images
        ours = gd.sample(pipe, image=image, method="ode", transitions=3, inner_steps=1, generator=_seed(41),
                         output_type="latent", max_batch=3, **kw)
        h, w = theirs.shape[2:]
        assert (h, w) == ((64, 80) if not size else (SIZE, SIZE))
        torch.testing.assert_close(gd.postprocess(flow, ours, h, w, "pt"), theirs, atol=ATOL, rtol=0)
    # the references reach every call: a Klein pipeline that joins their tokens to the state's instead (what
    # the KV model was not trained for) samples something else
    plain = flux2_pipeline(types.SimpleNamespace(transformer=pipe.transformer, scheduler=pipe.scheduler,
                                                 vae=pipe.vae), "Flux2KleinPipeline", is_distilled=True)
    kw = dict(image=refs, method="ode", transitions=3, inner_steps=1, generator=_seed(41), output_type="latent",
              num_images_per_prompt=2, height=SIZE, width=SIZE, **emb)
    assert (gd.sample(plain, **kw) - gd.sample(pipe, **kw)).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match=r"guidance_scale=3.0: this FLUX.2 Klein pipeline is step-wise distilled"):
        gd.sample(pipe, guidance_scale=3.0, height=SIZE, width=SIZE, **emb)


def test_klein_kv_steering_and_glass_read_the_cache_at_every_batch_size(klein_kv):
    """GLASS and FK steering call the transformer on other batch sizes and times than the pipeline; each call
    equals a call that extracts the references' keys and values itself."""
    flow = gd.as_flow(klein_kv)
    emb = flux2_embeds(2, seed=42)
    cond = gd.encode(flow, **emb)
    tokens, ids, _ = gd.reference_tokens(flow, _references()[0])
    cond.context, cond.context_ids = tokens.expand(2, -1, -1), ids
    model = flow.flow_model(cond, 3, SIZE, SIZE, max_batch=4)
    x, t = torch.randn(12, H2 * H2, 16, generator=_seed(43)), torch.rand(12, generator=_seed(44))
    img_ids, txt_ids, _ = flow.packed_inputs(SIZE, SIZE, emb["prompt_embeds"].shape[1], None, x.device, x.dtype)
    with torch.no_grad():
        got = model.velocity(x, t)
        rows = torch.arange(12) // 6     # prompt-major: two copies of each of the six rows
        want = -flow.transformer(hidden_states=torch.cat([tokens.expand(12, -1, -1), x], dim=1), timestep=1 - t,
                                 guidance=None, encoder_hidden_states=emb["prompt_embeds"][rows], txt_ids=txt_ids,
                                 img_ids=torch.cat([ids, img_ids]), return_dict=False, kv_cache_mode="extract",
                                 num_ref_tokens=tokens.shape[1])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    imgs, res = gd.steer(klein_kv, None, lambda im, p: im.mean(dim=(1, 2, 3)), particles=3, transitions=2,
                         inner_steps=2, image=_references()[0], generator=_seed(45), **emb)
    assert imgs.shape == (2, 3, 64, 80) and torch.isfinite(res.rewards).all()
    kw = dict(transitions=2, inner_steps=2, image=_references()[0], output_type="latent", **emb)
    eager = gd.sample(klein_kv, generator=_seed(46), **kw)
    compiled = gd.sample(klein_kv, generator=_seed(46), compile={"backend": "eager"}, **kw)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)


def test_steering_with_reference_images(klein):
    imgs, res = gd.steer(klein, None, lambda im, p: im.mean(dim=(1, 2, 3)), particles=2, transitions=2,
                         inner_steps=1, image=_references()[0], guidance_scale=2.0, generator=_seed(33),
                         **flux2_embeds(2, negative=True))
    assert imgs.shape == (2, 3, 64, 80) and res.samples.shape == (2, 2, 16 * 20, 16)
    assert torch.isfinite(res.rewards).all()


# ------------------------------------------------------------------------------------------------ end to end
def test_glass_gives_finite_reproducible_images(flux2, klein):
    for parts, extra in ((flux2, {}), (klein, {"guidance_scale": 3.0})):
        emb = flux2_embeds(2, seed=20, negative=parts is klein)
        kw = dict(method="glass", transitions=3, inner_steps=2, num_images_per_prompt=2, height=SIZE, width=SIZE,
                  **emb, **extra)
        imgs = gd.sample(parts, generator=_seed(21), output_type="pt", **kw)
        assert imgs.shape == (4, 3, SIZE, SIZE) and torch.isfinite(imgs).all()
        a, b = (gd.sample(parts, generator=_seed(22), output_type="latent", **kw) for _ in range(2))
        c = gd.sample(parts, generator=_seed(23), output_type="latent", **kw)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (a - c).abs().max() > 1e-3


def test_steering_with_a_latent_reward(flux2, klein):
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    for parts, extra in ((flux2, {}), (klein, {"guidance_scale": 3.0})):
        emb = flux2_embeds(2, seed=24, negative=parts is klein)
        imgs, res = gd.steer(parts, ["a cat", "a dog"], brightness, particles=3, transitions=3, inner_steps=2,
                             height=SIZE, width=SIZE, generator=_seed(25), max_batch=4, **emb, **extra)
        assert imgs.shape == (2, 3, SIZE, SIZE) and torch.isfinite(imgs).all()
        assert res.samples.shape == (2, 3, H2 * H2, 16) and torch.isfinite(res.rewards).all()
        best = res.rewards.argmax(dim=1)
        torch.testing.assert_close(res.best, res.samples[torch.arange(2), best])
    _, beam = gd.steer(flux2, None, brightness, particles=2, algorithm="beam", expansions=2, transitions=2,
                       inner_steps=1, height=SIZE, width=SIZE, generator=_seed(26), **flux2_embeds(1))
    assert torch.all(beam.rewards[:, 0] >= beam.rewards[:, 1])


def test_compiled_transitions_and_image_guidance(klein):
    emb = flux2_embeds(1, seed=34, negative=True)
    lat = gd.as_flow(klein).noise(2, SIZE, SIZE, _seed(35))
    kw = dict(transitions=2, inner_steps=2, num_images_per_prompt=2, height=SIZE, width=SIZE, latents=lat,
              guidance_scale=2.0, **emb)
    eager = gd.sample(klein, generator=_seed(36), output_type="latent", **kw)
    compiled = gd.sample(klein, generator=_seed(36), output_type="latent", compile={"backend": "eager"}, **kw)
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)

    def redness(images, prompts):   # differentiable through the VAE and the batch-norm statistics
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))

    plain = redness(gd.sample(klein, generator=_seed(36), **kw), None)
    for scale, better in ((3000.0, torch.gt), (-3000.0, torch.lt)):
        guide = gd.ImageGuidance(redness, scale=scale, window=(0.0, 1.0))
        guided = redness(gd.sample(klein, generator=_seed(36), guidance=guide, max_batch=3, **kw), None)
        assert torch.all(better(guided, plain))


def test_max_batch_chunks_give_the_same_guided_field(klein):
    flow = gd.as_flow(klein)
    emb = flux2_embeds(3, seed=27, negative=True)
    cond = gd.encode(flow, cfg=True, **emb)
    x, t = torch.randn(6, H2 * H2, 16, generator=_seed(28)), torch.rand(6, generator=_seed(29))
    whole = flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=3.0)
    chunked = flow.flow_model(cond, 2, SIZE, SIZE, cfg_scale=3.0, max_batch=4)
    with torch.no_grad():
        torch.testing.assert_close(chunked.velocity(x, t), whole.velocity(x, t), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
def test_arguments_flux2_cannot_take_are_named(flux2, klein):
    kw = dict(height=SIZE, width=SIZE)
    emb = flux2_embeds(1)
    with pytest.raises(ValueError, match="FLUX.2 has one text encoder and no pooled embeddings: "
                                         "pooled_prompt_embeds cannot be used"):
        gd.sample(flux2, **random_embeds(1, DIM), **kw)
    with pytest.raises(ValueError, match="prompt_2, negative_prompt_3 cannot be used"):
        gd.sample(flux2, prompt_2="a", negative_prompt_3="b", **emb, **kw)
    with pytest.raises(ValueError, match="ip_adapter_image_embeds: FLUX.2 pipelines take no IP-Adapter"):
        gd.sample(flux2, ip_adapter_image_embeds=torch.randn(1, 1, 8), **emb, **kw)
    with pytest.raises(ValueError, match="context_auto_resize=False is FLUX.1 Kontext's"):
        gd.sample(flux2, context_image=_references()[0], context_auto_resize=False, **emb, **kw)
    with pytest.raises(ValueError, match="pass FLUX.2's reference image once"):
        gd.sample(flux2, image=_references()[0], context_image=_references()[1], **emb, **kw)
    with pytest.raises(ValueError, match="strength=0.4 applies to image-to-image, but image= is FLUX.2's reference"):
        gd.sample(flux2, image=_references()[0], strength=0.4, **emb, **kw)
    with pytest.raises(ValueError, match="Image must be a PIL.Image.Image"):
        gd.sample(flux2, image=torch.rand(1, 3, 64, 64), **emb, **kw)
    with pytest.raises(ValueError, match="image \\(FLUX.2's reference images\\) is an empty list"):
        gd.sample(flux2, image=[], **emb, **kw)
    with pytest.raises(ValueError, match=r"true_cfg_scale=2.0: FLUX.2 Klein's classifier-free guidance weight is "
                                         r"guidance_scale"):
        gd.sample(klein, true_cfg_scale=2.0, **flux2_embeds(1, negative=True), **kw)
    with pytest.raises(ValueError, match="classifier-free guidance needs negative_prompt_embeds when the pipeline "
                                         "has no text encoder"):
        gd.sample(klein, **emb, **kw)     # Klein guides by default (guidance_scale 4.0), negative prompt ""
    with pytest.raises(ValueError, match="prompt_embeds is required when the pipeline has no text encoder"):
        gd.sample(flux2, "a cat", **kw)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds has shape \(1, 5, 32\) but prompt_embeds "
                                         r"\(1, 7, 32\)"):
        gd.sample(klein, negative_prompt_embeds=torch.randn(1, 5, DIM), **emb, **kw)
    with pytest.raises(ValueError, match="text_encoder_out_layers is a FLUX.2 argument"):
        gd.sample(gd.DiffusersFlow(_flux1(), flux2.scheduler),
                  text_encoder_out_layers=(1, 2), **random_embeds(1, DIM), **kw)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 64, 16\) \(prompts x rows per prompt, "
                                         r"then the FLUX.2 state layout\)"):
        gd.sample(flux2, num_images_per_prompt=2, latents=torch.randn(2, 16, H2, H2), **emb, **kw)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4 pixels for this FLUX.2 model"):
        gd.sample(flux2, height=30, width=SIZE, **emb)


def test_other_flux2_pipelines_are_rejected(flux2):
    other = type("Flux2OtherPipeline", (), dict(transformer=flux2.transformer, scheduler=flux2.scheduler,
                                                 vae=flux2.vae))()
    with pytest.raises(TypeError, match="Flux2OtherPipeline is not supported: glass_fast reproduces the FLUX.2 "
                                        "pipelines Flux2Pipeline, Flux2KleinPipeline, Flux2KleinInpaintPipeline "
                                        "and Flux2KleinKVPipeline"):
        gd.sample(other, height=SIZE, width=SIZE, **flux2_embeds(1))


def _flux1():
    from diffusers_parts import tiny_flux_transformer
    return tiny_flux_transformer()


def test_a_flux2_transformer_needs_the_flux2_vae(flux2):
    with pytest.raises(TypeError, match="a FLUX.2 transformer needs the FLUX.2 VAE \\(AutoencoderKLFlux2"):
        gd.as_flow(types.SimpleNamespace(transformer=flux2.transformer, scheduler=flux2.scheduler, vae=tiny_vae()))
