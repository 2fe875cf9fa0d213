"""StableDiffusion3Generator and FluxGenerator against diffusers' own pipelines: tiny random models saved as diffusers
folders, loaded by both; our ODE sampler must give the pipeline's latents (and images) for the same initial noise, with
CFG (SD3, with and without T5, with and without dynamic shifting), the distilled guidance embedding and true CFG
(FLUX); NFE is counted; LoRA hits the transformers' attention and a DRaFT step reaches it; bad input is refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from domains.images.flow import FluxGenerator, StableDiffusion3Generator, calculate_shift
from rewardopt.testing.contracts import GeneratorContract
from tests.images.tiny_flow import SIZE, T5_TOKENS, flux_components, sd3_components

PROMPTS = ["a red circle", "the dog on the grass"]
STEPS = 4
COMMON = dict(height=SIZE, width=SIZE, num_steps=STEPS, max_sequence_length=T5_TOKENS, lora_rank=None)


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    """Folders written by our save_pretrained: with T5, without T5, with a dynamically shifting scheduler."""
    out = {}
    for name, kw in {"t5": {}, "no_t5": {"t5": False}, "dynamic": {"dynamic_shift": True}}.items():
        d = tmp_path_factory.mktemp(f"sd3_{name}")
        StableDiffusion3Generator.from_components(**sd3_components(**kw), **COMMON).save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    FluxGenerator.from_components(**flux_components(), **COMMON).save_pretrained(d)
    return d


def _noise(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["t5", "no_t5", "dynamic"])
def test_sd3_sampler_matches_pipeline(sd3_dirs, kind):
    d = sd3_dirs[kind]
    # a folder without T5 loads as the pipeline loads SD3 without T5: text_encoder_3=None, tokenizer_3=None
    pipe = StableDiffusion3Pipeline.from_pretrained(d, **({"text_encoder_3": None, "tokenizer_3": None}
                                                          if kind == "no_t5" else {}))
    assert (pipe.text_encoder_3 is None) == (kind == "no_t5")
    gen = StableDiffusion3Generator(str(d), **{**COMMON, "guidance_scale": 3.0})
    assert (gen.text_encoder_3 is None) == (kind == "no_t5")
    x_T = _noise((len(PROMPTS), 4, SIZE // 2, SIZE // 2))
    call = dict(num_inference_steps=STEPS, guidance_scale=3.0, max_sequence_length=T5_TOKENS, height=SIZE, width=SIZE)
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=x_T.clone(), output_type="latent", **call).images
        ours = gen.sample(gen.encode_condition(PROMPTS), x_T=x_T.clone())
        ref_img = pipe(PROMPTS, latents=x_T.clone(), output_type="pt", **call).images
        our_img = gen.decode(ours)
    assert gen.counter.nfe == STEPS * len(PROMPTS)  # a CFG pass over B rows counts B
    torch.testing.assert_close(gen.sigmas, pipe.scheduler.sigmas)  # the same σ schedule (mu where dynamic)
    assert (ours - ref).abs().max() <= 1e-5
    assert (our_img - ref_img).abs().max() <= 1e-5
    if kind == "dynamic":
        cfg = pipe.scheduler.config
        assert gen.mu == pytest.approx(calculate_shift((SIZE // 4) ** 2, cfg.base_image_seq_len, cfg.max_image_seq_len,
                                                       cfg.base_shift, cfg.max_shift))


def test_sd3_without_t5_is_zeros_and_use_t5_false_drops_it(sd3_dirs):
    gen = StableDiffusion3Generator(str(sd3_dirs["t5"]), use_t5=False, **COMMON)
    assert gen.text_encoder_3 is None
    states = gen.encode_condition(PROMPTS).tensors["encoder_hidden_states"]
    assert states.shape == (2, 8 + T5_TOKENS, 48)
    assert states[:, 8:].abs().max() == 0 and states[:, :8, 40:].abs().max() == 0  # T5 zeros; CLIP 16+24 padded
    assert states[:, :8, :40].abs().max() > 0


@pytest.mark.parametrize("true_cfg, embeds", [(1.0, True), (2.5, True), (1.0, False)])
def test_flux_sampler_matches_pipeline(flux_dir, tmp_path, true_cfg, embeds):
    if not embeds:  # a FLUX.1-schnell-like transformer: no guidance embedding
        FluxGenerator.from_components(**flux_components(guidance_embeds=False), **COMMON).save_pretrained(tmp_path)
        flux_dir = tmp_path
    pipe = FluxPipeline.from_pretrained(flux_dir)
    gen = FluxGenerator(str(flux_dir), **COMMON, guidance_scale=3.5, true_cfg_scale=true_cfg)
    cond = gen.encode_condition(PROMPTS)
    x_T = gen.init_state(cond, torch.Generator().manual_seed(3))
    assert x_T.shape == (2, (SIZE // 4) ** 2, 16)  # packed: (h/2)(w/2) tokens of 4C channels
    call = dict(num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=T5_TOKENS, height=SIZE, width=SIZE)
    if true_cfg > 1:
        call.update(true_cfg_scale=true_cfg, negative_prompt="")
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=x_T.clone(), output_type="latent", **call).images
        ours = gen.sample(cond, x_T=x_T.clone())
        # the same seed draws the same noise as the pipeline (which draws (B, C, h, w) and packs it)
        ref_seeded = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt", **call).images
        our_img = gen.decode(ours)
    assert gen.counter.nfe == STEPS * len(PROMPTS)
    torch.testing.assert_close(gen.sigmas, pipe.scheduler.sigmas)
    assert (ours - ref).abs().max() <= 1e-5
    assert (our_img - ref_seeded).abs().max() <= 1e-5


def test_flux_guidance_embedding_is_used(flux_dir):
    gens = [FluxGenerator(str(flux_dir), **COMMON, guidance_scale=g) for g in (1.0, 4.0)]
    cond = gens[0].encode_condition(PROMPTS)
    x = gens[0].init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (g.model_output(x, 0, cond) for g in gens)
    assert (a - b).abs().max() > 1e-4
    assert gens[0].guidance_scale == 1.0  # the CFG weight (true_cfg_scale): no second pass


def test_flux_pack_unpack_and_encode_decode(flux_dir):
    gen = FluxGenerator(str(flux_dir), **COMMON)
    z = _noise((2, 4, SIZE // 2, SIZE // 2))
    packed = gen.pack(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, 4, SIZE // 2, SIZE // 2), rtol=0, atol=0)
    torch.testing.assert_close(gen.unpack(packed), z, rtol=0, atol=0)
    ids = gen.image_ids("cpu", torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, SIZE // 4, SIZE // 4, "cpu",
                                                                           torch.float32))
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.manual_seed(0)
    x0 = gen.encode_images(images)
    assert x0.shape == packed.shape and gen.decode(x0).shape == images.shape
    torch.manual_seed(0)
    z = gen.vae.encode(images * 2 - 1).latent_dist.sample()  # the VAE's shift and scaling, then the packing
    torch.testing.assert_close(x0, gen.pack((z - 0.1) * 0.8))


# ------------------------------------------------------------------ LoRA and DRaFT
@pytest.mark.parametrize("cls, comps", [(StableDiffusion3Generator, sd3_components),
                                        (FluxGenerator, flux_components)])
def test_lora_hits_attention_and_a_draft_step_reaches_it(cls, comps):
    gen = cls.from_components(**comps(), **{**COMMON, "lora_rank": 4, "gradient_checkpointing": True})
    names = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and n.startswith("denoiser.") for n in names)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f".{proj}.lora_A" in n for n in names), proj
    assert any("single_transformer_blocks" in n for n in names) == (cls is FluxGenerator)
    torch.manual_seed(1)  # make the LoRA's B nonzero, so the adapter changes the output
    for n, p in gen.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    cond = gen.encode_condition(PROMPTS)
    x = gen.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=1)
    assert gen.counter.nfe_grad == len(PROMPTS) and gen.counter.nfe == STEPS * len(PROMPTS)
    gen.decode(x).mean().backward()
    grads = [p.grad for p in gen.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad(), gen.base_model():
        base = gen.model_output(x.detach(), 0, cond)
    assert (base - gen.model_output(x.detach(), 0, cond).detach()).abs().max() > 0


@pytest.mark.parametrize("cls, comps, pipeline", [(StableDiffusion3Generator, sd3_components, StableDiffusion3Pipeline),
                                                  (FluxGenerator, flux_components, FluxPipeline)])
def test_lora_saved_in_diffusers_format_loads_into_pipeline(tmp_path, cls, comps, pipeline):
    gen = cls.from_components(**comps(), **{**COMMON, "lora_rank": 4})
    for n, p in gen.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    assert gen.save_lora(tmp_path / "lora").is_file()
    pipe = pipeline(**comps())
    pipe.load_lora_weights(str(tmp_path / "lora"))
    cond = gen.encode_condition(PROMPTS)
    x = gen.init_state(cond, torch.Generator().manual_seed(0))
    t = gen.timesteps[1].expand(2)
    with torch.no_grad():
        ours = gen._denoiser_output(gen.denoiser, x, t, cond.tensors)
        with gen.base_model():
            base = gen._denoiser_output(gen.denoiser, x, t, cond.tensors)
        gen.denoiser = pipe.transformer  # the pipeline's transformer with the loaded LoRA, called the same way
        theirs = gen._denoiser_output(gen.denoiser, x, t, cond.tensors)
    assert (ours - base).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5


# ------------------------------------------------------------------ contracts
class TestSD3Contract(GeneratorContract):
    raw_conditions = PROMPTS

    @pytest.fixture
    def make_generator(self):
        return lambda: StableDiffusion3Generator.from_components(
            **sd3_components(), **{**COMMON, "num_steps": 2, "lora_rank": 4, "gradient_checkpointing": False,
                                   "sde_noise_level": 0.7})


class TestFluxContract(GeneratorContract):
    raw_conditions = PROMPTS

    @pytest.fixture
    def make_generator(self):
        return lambda: FluxGenerator.from_components(
            **flux_components(), **{**COMMON, "num_steps": 2, "lora_rank": 4, "gradient_checkpointing": False})


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls, comps", [(StableDiffusion3Generator, sd3_components),
                                        (FluxGenerator, flux_components)])
def test_size_not_divisible_is_a_clear_error(cls, comps):
    with pytest.raises(ValueError, match="height=18 is not a positive multiple of 4"):
        cls.from_components(**comps(), **{**COMMON, "height": 18})


def test_sd3_size_beyond_position_embedding_is_refused():
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        StableDiffusion3Generator.from_components(**sd3_components(), **{**COMMON, "height": 64})


@pytest.mark.parametrize("cls", [StableDiffusion3Generator, FluxGenerator])
def test_missing_or_wrong_folder_is_a_clear_error(cls, tmp_path):
    with pytest.raises(FileNotFoundError, match="no .* model folder"):
        cls(str(tmp_path / "nope"), **COMMON)
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="no transformer/ subfolder"):
        cls(str(tmp_path), **COMMON)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="max_sequence_length"):
        StableDiffusion3Generator.from_components(**sd3_components(), **{**COMMON, "max_sequence_length": 600})
    with pytest.raises(ValueError, match="from_components needs"):
        FluxGenerator.from_components(**{k: v for k, v in flux_components().items() if k != "vae"}, **COMMON)
    comps = sd3_components()
    comps["tokenizer_3"] = None
    with pytest.raises(ValueError, match="go together"):
        StableDiffusion3Generator.from_components(**comps, **COMMON)


def test_low_precision_weights_keep_float32_lora_and_states(flux_dir):
    gen = FluxGenerator(str(flux_dir), **{**COMMON, "lora_rank": 4, "dtype": "bfloat16"})
    assert gen.denoiser.dtype == torch.bfloat16 and gen.text_encoder_2.dtype == torch.bfloat16
    assert {p.dtype for p in gen.trainable_parameters()} == {torch.float32}
    x = gen.sample(gen.encode_condition(PROMPTS), generator=torch.Generator().manual_seed(0), grad_last_k=1)
    assert x.dtype == torch.float32 and x.isfinite().all()
    gen.decode(x).mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in gen.trainable_parameters()) > 0
    with pytest.raises(ValueError, match="generator.dtype must be one of"):
        FluxGenerator(str(flux_dir), **{**COMMON, "dtype": "fp8"})
    comps = sd3_components()
    gen = StableDiffusion3Generator.from_components(**comps, **{**COMMON, "lora_rank": 4, "dtype": "bfloat16"})
    assert gen.denoiser.dtype == torch.bfloat16 and gen.text_encoder_3.dtype == torch.bfloat16  # in-memory: cast
    assert {p.dtype for p in gen.trainable_parameters()} == {torch.float32}
