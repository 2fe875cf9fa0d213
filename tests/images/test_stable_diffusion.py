"""StableDiffusionGenerator: parity with diffusers, truncation, checkpointing, LoRA, loading, errors."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from domains.images.stable_diffusion import StableDiffusionGenerator
from domains.images.tiny import build_tokenizer, tiny_scheduler, tiny_text_encoder, tiny_unet
from rewardopt.testing.contracts import GeneratorContract
from tests.conftest import tiny_generator

PROMPTS = ["two red circles", "one blue square", "three green triangles"]


class TestStableDiffusionGeneratorContract(GeneratorContract):
    raw_conditions = PROMPTS

    @pytest.fixture
    def make_generator(self):
        return tiny_generator


class TestStableDiffusionGeneratorDDPMContract(GeneratorContract):
    raw_conditions = PROMPTS[:2]

    @pytest.fixture
    def make_generator(self):
        return lambda: tiny_generator(sampler="ddpm")


@pytest.fixture(scope="module")
def latent_components():
    """A tiny latent-space SD (VAE + UNet + CLIP text encoder) from configs, seeded."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    unet = tiny_unet(size=8, in_channels=4, channels=(8, 16))
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=16)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=tiny_text_encoder(len(tok)).eval(), tokenizer=tok,
                scheduler=tiny_scheduler())


def test_sampling_matches_diffusers_pipeline(latent_components):
    c = latent_components
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    gen = StableDiffusionGenerator.from_components(**c, height=16, width=16, num_steps=6, guidance_scale=3.0,
                                                   lora_rank=None)
    x_T = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, eta=0.0, latents=x_T.clone(),
                   output_type="latent").images
        ours = gen.sample(gen.encode_condition(PROMPTS), x_T=x_T.clone())
        ref_img = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=x_T.clone(), output_type="pt").images
        our_img = gen.decode(ours)
    assert (ours - ref).abs().max() <= 1e-5
    assert (our_img - ref_img).abs().max() <= 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ddim_step_with_eta_matches_scheduler(eta):
    g = tiny_generator(eta=eta, lora_rank=None)
    cond = g.encode_condition(PROMPTS)
    sched = DDIMScheduler.from_config(g.scheduler.config)
    sched.set_timesteps(g.num_steps)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            noise = torch.randn_like(x)
            out = g.model_output(x, i, cond)
            ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
            ours = g.step(x, i, cond, noise=noise)
            assert (ours - ref).abs().max() <= 1e-5, f"step {i}"
            x = ref


def test_ddpm_step_matches_scheduler():
    g = tiny_generator(sampler="ddpm", lora_rank=None)
    cond = g.encode_condition(PROMPTS)
    sched = DDPMScheduler.from_config(g.scheduler.config)
    sched.set_timesteps(g.num_steps)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = g.model_output(x, i, cond)
            ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            ours = g.step(x, i, cond, noise=noise)
            assert (ours - ref).abs().max() <= 1e-5, f"step {i}"
            x = ref


def _count_backward_calls(g):
    """Hooks on the UNet: forwards that build a graph, and backward passes through each."""
    counts = {"grad_forwards": 0, "backwards": 0, "forwards": 0}

    def hook(module, args, output):
        counts["forwards"] += 1
        out = output[0] if isinstance(output, tuple) else output.sample
        if out.requires_grad:
            counts["grad_forwards"] += 1
            out.register_hook(lambda grad: counts.__setitem__("backwards", counts["backwards"] + 1))

    return counts, g.denoiser.register_forward_hook(hook)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_backward_runs_through_exactly_last_k_calls(k):
    g = tiny_generator(num_steps=4)
    cond = g.encode_condition(PROMPTS[:2])
    counts, handle = _count_backward_calls(g)
    x_T = g.init_state(cond, torch.Generator().manual_seed(0)).requires_grad_(True)
    x0 = g.sample(cond, x_T=x_T, grad_last_k=k)
    x0.square().mean().backward()
    handle.remove()
    assert counts["forwards"] == 4
    assert counts["grad_forwards"] == k
    assert counts["backwards"] == k
    if k < g.num_steps:
        assert x_T.grad is None, "the initial noise must get no gradient when K < T"
    else:
        assert x_T.grad is not None and x_T.grad.abs().sum() > 0


def test_early_steps_run_under_no_grad():
    g = tiny_generator(num_steps=4)
    cond = g.encode_condition(PROMPTS[:1])
    modes = []
    h = g.denoiser.register_forward_pre_hook(lambda m, a: modes.append(torch.is_grad_enabled()))
    g.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=1)
    h.remove()
    assert modes == [False, False, False, True]


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        g = tiny_generator(num_steps=3, gradient_checkpointing=ckpt)
        cond = g.encode_condition(PROMPTS[:2])
        x0 = g.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=None)
        x0.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in g.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_only_lora_parameters_are_trainable():
    g = tiny_generator()
    names = [n for n, p in g.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in g.text_encoder.parameters())


def perturbed_lora_generator():
    """A tiny generator whose LoRA weights moved away from their (zero-effect) initialisation."""
    g = tiny_generator(num_steps=2)
    with torch.no_grad():
        for p in g.trainable_parameters():
            p.add_(0.5)
    cond = g.encode_condition(PROMPTS[:1])
    return g, cond, g.init_state(cond, torch.Generator().manual_seed(0))


def test_base_model_context_disables_lora():
    g, cond, x = perturbed_lora_generator()
    with torch.no_grad():
        tuned = g.model_output(x, 0, cond)
        with g.base_model():
            base = g.model_output(x, 0, cond)
        again = g.model_output(x, 0, cond)
    assert not torch.allclose(tuned, base)
    assert torch.equal(tuned, again)


def test_lora_scale_zero_equals_base():
    g, cond, x = perturbed_lora_generator()
    with torch.no_grad():
        with g.base_model():
            base = g.model_output(x, 0, cond)
        g.lora_scale = 0.0
        scaled = g.model_output(x, 0, cond)
    assert torch.allclose(base, scaled, atol=1e-6)


def test_lora_saved_in_diffusers_format_loads_into_pipeline(latent_components, tmp_path):
    c = latent_components
    gen = StableDiffusionGenerator.from_components(**{**c, "unet": tiny_unet(size=8, in_channels=4, channels=(8, 16))},
                                                   height=16, width=16, num_steps=2, lora_rank=4)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.normal_(0, 0.3)
    path = gen.save_lora(tmp_path / "adapter")
    assert path.is_file()
    torch.manual_seed(0)
    unet = tiny_unet(size=8, in_channels=4, channels=(8, 16))
    unet.load_state_dict({k.replace("base_layer.", ""): v for k, v in gen.denoiser.state_dict().items()
                          if "lora_" not in k})
    pipe = StableDiffusionPipeline(**{**c, "unet": unet}, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=2, guidance_scale=7.5, latents=x_T, output_type="latent")
    with torch.no_grad():
        before = pipe(PROMPTS[:1], **kw).images
        pipe.load_lora_weights(str(tmp_path / "adapter"))
        after = pipe(PROMPTS[:1], **kw).images
        ours = gen.sample(gen.encode_condition(PROMPTS[:1]), x_T=x_T)
    assert not torch.allclose(before, after)
    assert (after - ours).abs().max() < 1e-4


def test_load_by_path_roundtrip(tiny_model_dir):
    g = StableDiffusionGenerator(str(tiny_model_dir), height=16, width=16, num_steps=2, guidance_scale=2.0,
                                 lora_rank=None)
    ref = tiny_generator(lora_rank=None, num_steps=2)
    cond_a, cond_b = g.encode_condition(PROMPTS), ref.encode_condition(PROMPTS)
    with torch.no_grad():
        a = g.sample(cond_a, generator=torch.Generator().manual_seed(0))
        b = ref.sample(cond_b, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-6)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="generator.pretrained"):
        StableDiffusionGenerator(str(tmp_path / "nope"), height=16, width=16)
    with pytest.raises(ValueError, match="unknown embedded model"):
        StableDiffusionGenerator("embedded:nothing", height=16, width=16)


def test_wrong_image_size_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="generator.height=15"):
        StableDiffusionGenerator(str(tiny_model_dir), height=15, width=16)


def test_unsupported_scheduler_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="sampler must be one of"):
        StableDiffusionGenerator(str(tiny_model_dir), height=16, width=16, sampler="euler")
