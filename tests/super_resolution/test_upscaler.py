"""SuperResolutionGenerator: parity with diffusers' StableDiffusionUpscalePipeline (saved with our
save_pretrained, loaded by path), LoRA in the pipeline's format, the paired denoising loss, input errors,
the condition data module and the embedded model."""

import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline

from domains.super_resolution.glyphs import GlyphDataset
from domains.super_resolution.tiny import GlyphConditionDataModule, build_tiny_sr_generator, rescale_latents
from domains.super_resolution.upscaler import SuperResolutionGenerator, glyph_conditions
from rewardopt.generators.capabilities import ImageSamples, PairedDenoisingLoss
from rewardopt.testing.contracts import GeneratorContract

SMALL = dict(vae_channels=(8, 16, 16), unet_channels=(16, 32), max_noise_level=60)


def tiny_sr(**kw):
    kw.setdefault("num_steps", 3)
    kw.setdefault("guidance_scale", 3.0)
    kw.setdefault("lora_rank", None)
    kw.setdefault("noise_level", 30)
    return build_tiny_sr_generator(seed=0, size=16, **SMALL, **kw)


def conditions(n=2, size=16, seed=3):
    return glyph_conditions(GlyphDataset(n, size, seed), range(n))


def perturb(module, scale=0.05, seed=1):
    """Random weights everywhere (the tiny UNet's noise-level embeddings start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


class TestSuperResolutionGeneratorContract(GeneratorContract):
    raw_conditions = conditions(2)

    @pytest.fixture
    def make_generator(self):
        return lambda: tiny_sr(lora_rank=2)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    gen = tiny_sr()
    perturb(gen.denoiser)
    path = tmp_path_factory.mktemp("sr") / "pipe"
    gen.save_pretrained(path)
    return path


def lr_and_noise(n=2, seed=5):
    raw = conditions(n)
    lr = torch.stack([r["image"] for r in raw])
    noise = torch.randn(lr.shape, generator=torch.Generator().manual_seed(seed))  # what the pipeline draws first
    for r, e in zip(raw, noise):
        r["lr_noise"] = e
    return raw, lr


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", None)])
def test_sampling_matches_upscale_pipeline(pipeline_dir, sampler, eta):
    """Same LR noise and x_T, CFG 3, noise level 30: our latents and images equal the pipeline's to 1e-5
    (DDIM η = 0; DDPM with the same per-step noise)."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(pipeline_dir)
    assert pipe.config.max_noise_level == 60 and pipe.vae.config.scaling_factor == 0.08333
    gen = SuperResolutionGenerator(str(pipeline_dir), sampler=sampler, num_steps=4, guidance_scale=3.0,
                                   noise_level=30, lora_rank=None)
    if sampler == "ddpm":
        from diffusers import DDPMScheduler

        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert gen.max_noise_level == 60 and isinstance(gen, (ImageSamples, PairedDenoisingLoss))
    raw, lr = lr_and_noise()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    prompts = [r["prompt"] for r in raw]
    kw = dict(num_inference_steps=4, guidance_scale=3.0, noise_level=30)
    with torch.no_grad():
        ref = pipe(prompts, image=lr, latents=x_T.clone(), generator=torch.Generator().manual_seed(5),
                   output_type="latent", **kw).images
        ref_img = pipe(prompts, image=lr, latents=x_T.clone(), generator=torch.Generator().manual_seed(5),
                       output_type="pt", **kw).images
        cond = gen.encode_condition(raw)
        if sampler == "ddpm":  # the pipeline's step noise: its generator after the LR noise
            g = torch.Generator().manual_seed(5)
            torch.randn(lr.shape, generator=g)
            ours = gen.sample(cond, x_T=x_T.clone(), generator=g)
        else:
            ours = gen.sample(cond, x_T=x_T.clone())
        img = gen.decode(ours)
    assert ours.shape == ref.shape == (2, 4, 4, 4)
    assert (ours - ref).abs().max() <= 1e-5
    assert img.shape == ref_img.shape == (2, 3, 16, 16)
    assert (img - ref_img).abs().max() <= 1e-5
    assert float(ours.abs().mean()) > 0.1  # not a degenerate all-zero comparison
    assert gen.counter.nfe == 2 * 4 and gen.counter.decodes == 2


def test_noise_level_and_lr_change_the_output(pipeline_dir):
    """The LR image and its noise level reach the UNet (the concatenated channels, the class embedding)."""
    gen = SuperResolutionGenerator(str(pipeline_dir), num_steps=2, lora_rank=None, noise_level=30)
    raw, _ = lr_and_noise()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = gen.sample(gen.encode_condition(raw), x_T=x_T)
        gen.noise_level = 0
        b = gen.sample(gen.encode_condition(raw), x_T=x_T)
        flipped = [{**r, "image": r["image"].flip(-1)} for r in raw]
        c = gen.sample(gen.encode_condition(flipped), x_T=x_T)
    assert (a - b).abs().max() > 1e-4 and (b - c).abs().max() > 1e-4


def test_unconditional_branch_shares_image_and_noise_level():
    gen = tiny_sr()
    cond = gen.encode_condition(conditions(2))
    u = gen._uncond_tensors(cond)
    assert u["image"] is cond.tensors["image"] and u["noise_level"] is cond.tensors["noise_level"]
    assert torch.equal(u["encoder_hidden_states"][0], gen._embed([""])[0])
    assert cond.raw[0]["hr"].shape == (3, 16, 16)  # the raw dicts are kept for rewards


def test_denoising_loss_reaches_lora_and_is_finite():
    gen = tiny_sr(lora_rank=2)
    perturb(gen.denoiser)
    lora = [p for n, p in gen.denoiser.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for p in gen.vae.parameters())
    raw = conditions(3)
    loss = gen.denoising_loss(raw, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in lora) and any(float(p.grad.abs().sum()) > 0 for p in lora)
    assert gen.counter.nfe == 3 and gen.counter.nfe_grad == 3
    again = gen.denoising_loss(raw, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss, again)  # the generator draws every random number
    other = gen.denoising_loss(raw, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(loss, other)
    no_lr = [{"hr": r["hr"], "prompt": r["prompt"]} for r in raw]  # the LR is derived from the HR
    assert torch.isfinite(gen.denoising_loss(no_lr, noise_level=10))


def test_denoising_loss_needs_pairs():
    gen = tiny_sr()
    with pytest.raises(KeyError, match="no 'hr'"):
        gen.denoising_loss([{"image": torch.rand(3, 4, 4), "prompt": ""}])
    bad = conditions(1)
    bad[0]["hr"] = torch.rand(3, 12, 12)
    with pytest.raises(ValueError, match="HR images are"):
        gen.denoising_loss(bad)


def test_lora_saved_in_diffusers_format_loads_into_the_pipeline_and_back(pipeline_dir, tmp_path):
    gen = SuperResolutionGenerator(str(pipeline_dir), num_steps=2, guidance_scale=2.0, noise_level=30, lora_rank=2)
    perturb(torch.nn.ParameterList([p for n, p in gen.denoiser.named_parameters() if "lora_" in n]), 0.3)
    path = gen.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    raw, lr = lr_and_noise()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    fresh = SuperResolutionGenerator(str(pipeline_dir), num_steps=2, guidance_scale=2.0, noise_level=30, lora_rank=2)
    with torch.no_grad():
        base = fresh.sample(fresh.encode_condition(raw), x_T=x_T.clone())
        fresh.load_lora(tmp_path / "lora")
        ours = gen.sample(gen.encode_condition(raw), x_T=x_T.clone())
        loaded = fresh.sample(fresh.encode_condition(raw), x_T=x_T.clone())
        ref = pipe([r["prompt"] for r in raw], image=lr, latents=x_T.clone(), num_inference_steps=2,
                   guidance_scale=2.0, noise_level=30, generator=torch.Generator().manual_seed(5),
                   output_type="latent").images
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    assert (loaded - ours).abs().max() <= 1e-5 and (ref - ours).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="rank"):
        SuperResolutionGenerator(str(pipeline_dir), lora_rank=4).load_lora(tmp_path / "lora")


def test_bad_inputs_are_clear_errors(pipeline_dir):
    gen = SuperResolutionGenerator(str(pipeline_dir), num_steps=2, lora_rank=None, height=16, width=16)
    with pytest.raises(ValueError, match="needs 4x4 LR inputs"):
        gen.encode_condition([torch.rand(3, 8, 8)])
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        gen.encode_condition([torch.rand(1, 4, 4)])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        gen.encode_condition([torch.rand(3, 4, 4) * 2 - 1])
    with pytest.raises(ValueError, match="share one size"):
        SuperResolutionGenerator(str(pipeline_dir), lora_rank=None).encode_condition(
            [torch.rand(3, 4, 4), torch.rand(3, 8, 8)])
    with pytest.raises(ValueError, match="multiple of the UNet's downsampling"):
        SuperResolutionGenerator(str(pipeline_dir), lora_rank=None).encode_condition([torch.rand(3, 5, 5)])
    with pytest.raises(ValueError, match="lr_noise"):
        gen.encode_condition([{"image": torch.rand(3, 4, 4), "lr_noise": torch.rand(3, 2, 2)}])
    with pytest.raises(KeyError, match="'image'"):
        gen.encode_condition([{"prompt": "a digit"}])
    with pytest.raises(TypeError, match="list"):
        gen.encode_condition(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="max_noise_level=60"):
        SuperResolutionGenerator(str(pipeline_dir), lora_rank=None, noise_level=61)
    with pytest.raises(ValueError, match="VAE factor 4"):
        SuperResolutionGenerator(str(pipeline_dir), lora_rank=None, height=18, width=18)


def test_plain_tensors_and_pil_images_are_conditions():
    from PIL import Image

    gen = tiny_sr()
    pil = Image.fromarray((torch.rand(4, 4, 3) * 255).byte().numpy())
    cond = gen.encode_condition([torch.rand(3, 4, 4), pil])
    assert cond.tensors["image"].shape == (2, 3, 4, 4) and cond.raw[1]["prompt"] == ""
    with torch.no_grad():
        assert gen.decode(gen.sample(cond)).shape == (2, 3, 16, 16)


def test_rescaled_latents_decode_the_same():
    gen = tiny_sr()
    hr = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = gen.vae.encode(hr).latent_dist
        before = gen.vae.decode(z.mean).sample
        rescale_latents(gen.vae, 3.0)
        z2 = gen.vae.encode(hr).latent_dist
        after = gen.vae.decode(z2.mean).sample
    assert torch.allclose(z2.mean, 3 * z.mean, atol=1e-5) and torch.allclose(z2.std, 3 * z.std, atol=1e-5)
    assert (after - before).abs().max() < 1e-4


def test_condition_datamodule_batches_are_raw_dicts_with_fixed_held_out_noise():
    dm = GlyphConditionDataModule(batch_size=2, val_batch_size=3, num_train=6, num_val=3, epoch_size=4)
    train = next(iter(dm.train_dataloader()))
    val, val2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert len(train) == 2 and {"image", "prompt", "hr", "label"} <= set(train[0])
    assert train[0]["lr_noise"].shape == (3, 8, 8)
    assert len(val) == 3 and torch.equal(val[0]["lr_noise"], val2[0]["lr_noise"])
    assert not torch.equal(val[0]["hr"], GlyphDataset(1, 32, 10)[0]["hr"])  # held-out seed, not the training one
    with pytest.raises(ValueError, match="differ"):
        GlyphConditionDataModule(num_train=2, num_val=2, train_seed=3, val_seed=3)


def test_embedded_tiny_glyphs_x4_loads():
    from domains.super_resolution.upscaler import EMBEDDED

    if not (EMBEDDED["embedded:tiny-glyphs-x4"] / "unet").is_dir():
        pytest.skip("embedded:tiny-glyphs-x4 is not built (recipes/super_resolution/pretrain_tiny.yaml)")
    gen = SuperResolutionGenerator("embedded:tiny-glyphs-x4", num_steps=2, lora_rank=None)
    cond = gen.encode_condition(glyph_conditions(GlyphDataset(2, 32, 11), range(2)))
    with torch.no_grad():
        out = gen.decode(gen.sample(cond))
    assert out.shape == (2, 3, 32, 32) and gen.vae.config.scaling_factor == 0.08333
