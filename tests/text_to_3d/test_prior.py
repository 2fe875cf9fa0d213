"""MultiViewPrior: the IP-Adapter path through diffusers' own code (loading, the UNet call, CFG), the image prompt's
effect and scale, "no image" = zero embeddings, save / load round trips (embedded and h94 layouts), clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from domains.text_to_3d.objects import PROMPTS
from domains.text_to_3d.prior import EMBEDDED, IP_WEIGHTS, MultiViewPrior, has_ip_adapter, without_ip_adapter
from domains.text_to_3d.scene import view_prompt
from domains.text_to_3d.tiny import MAX_TOKENS, TinyMultiViewPriorPretraining, build_tiny_prior, build_tokenizer
from rewardopt.generators.capabilities import ImagePrompt, ImagePrompted
from rewardopt.testing.contracts import GeneratorContract

SIZE = 16


def tiny(**kwargs) -> MultiViewPrior:
    """A random 16x16 prior (2 UNet levels, attention at 8x8; a 4-patch vision tower) with its IP-Adapter."""
    kwargs.setdefault("num_steps", 4)
    kwargs.setdefault("guidance_scale", 2.0)
    kwargs.setdefault("gradient_checkpointing", False)
    return build_tiny_prior(0, SIZE, (8, 16), prediction_type="epsilon", plain_levels=1, patch_size=8,
                            image_hidden=16, image_embed_dim=16, **kwargs)


def images(n: int, seed: int = 0, size: int = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, size, size, generator=g))


def conditions():
    a, b = images(2)
    return [ImagePrompt("a red cube, front view", a), "a blue cone on a red cube, side view",
            ImagePrompt("a green sphere and a red cone, back view", b)]


def eps(g: MultiViewPrior, raw, t=500, seed: int = 1) -> torch.Tensor:
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).expand(len(raw), -1, -1, -1)
    with torch.no_grad():
        return g.predict_noise_at(x, t, g.encode_condition(raw))


@pytest.fixture(scope="module")
def prior():
    return tiny(lora_rank=None).eval()


@pytest.fixture(scope="module")
def saved(prior, tmp_path_factory):
    d = tmp_path_factory.mktemp("prior")
    prior.save_pretrained(d)
    return d


class TestMultiViewPriorContract(GeneratorContract):
    raw_conditions = conditions()

    @pytest.fixture
    def make_generator(self):
        return lambda: tiny(lora_rank=4)


def test_tokenizer_fits_every_view_prompt_of_the_world():
    tok = build_tokenizer()
    for p in PROMPTS:
        for az, el in ((0, 0), (90, 10), (180, 20), (0, 80)):
            ids = tok(view_prompt(p, az, el)).input_ids
            assert len(ids) <= MAX_TOKENS and ids[-1] == tok.eos_token_id
            assert tok.unk_token_id not in ids, view_prompt(p, az, el)


def test_condition_tensors_and_zero_rows(prior):
    raw = conditions()
    cond = prior.encode_condition(raw)
    assert set(cond.tensors) == {"encoder_hidden_states", "image_embeds"}
    emb = cond.tensors["image_embeds"]
    assert emb.shape == (3, 1, 16)
    assert torch.equal(emb[1], torch.zeros(1, 16))  # the plain prompt: no image
    with torch.no_grad():
        assert torch.allclose(emb[[0, 2]], prior.embed_images([raw[0]["image"], raw[2]["image"]]))
    assert str(cond.raw[0]) == "a red cube, front view" and cond.raw[0] is raw[0]  # rewards read the ImagePrompt
    uncond = prior._uncond_tensors(cond)
    assert set(uncond) == set(cond.tensors) and torch.equal(uncond["image_embeds"], torch.zeros_like(emb))


def test_image_embeddings_are_computed_once_per_condition(prior):
    calls = []
    hook = prior.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        cond = prior.encode_condition(conditions())
        x = torch.randn(3, 3, SIZE, SIZE)
        with torch.no_grad():
            for t in (100, 500, 900):
                prior.predict_noise_at(x, t, cond)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_zero_embedding_row_equals_a_plain_prompt_alone(prior):
    raw = conditions()
    assert torch.allclose(eps(prior, raw)[1], eps(prior, [raw[1]])[0], atol=1e-5)


def test_image_prompt_changes_eps_and_scale_zero_removes_it():
    g = tiny(lora_rank=None)
    img = images(1)[0]
    with_image, text = [ImagePrompt("a red cube, front view", img)], ["a red cube, front view"]
    assert (eps(g, with_image) - eps(g, text)).abs().max() > 1e-3
    g.image_prompt_scale = 0.0
    assert {p.scale[0] for p in g.denoiser.attn_processors.values() if hasattr(p, "to_k_ip")} == {0.0}
    assert torch.equal(eps(g, with_image), eps(g, text))
    # scale 0 is the base text model: the UNet without its IP-Adapter layers
    g.guidance_scale = 1.0
    cond = g.encode_condition(text)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), without_ip_adapter(g.denoiser):
        base = g.denoiser(x, 500, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample
    assert torch.allclose(eps(g, with_image), base, atol=1e-6)
    g.image_prompt_scale = 1.0
    assert (eps(g, with_image) - eps(g, text)).abs().max() > 1e-3


def test_cfg_contrasts_with_empty_text_and_zero_image(prior):
    raw = conditions()
    cond = prior.encode_condition(raw)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(700)
    empty = prior.encode_condition([""] * 3).tensors["encoder_hidden_states"]
    unet = prior.denoiser
    with torch.no_grad():
        ours = prior.predict_noise_at(x, t, cond)
        c = unet(x, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                 added_cond_kwargs={"image_embeds": [cond.tensors["image_embeds"]]}).sample
        u = unet(x, t, encoder_hidden_states=empty,
                 added_cond_kwargs={"image_embeds": [torch.zeros_like(cond.tensors["image_embeds"])]}).sample
    assert torch.allclose(ours, u + prior.guidance_scale * (c - u), atol=1e-5)


def test_eps_and_sampling_match_diffusers_pipeline_with_ip_adapter_image_embeds(prior):
    """Our guided ε and a DDIM sample equal StableDiffusionPipeline's, given the same ``ip_adapter_image_embeds``
    (negative = zeros, as the pipeline's ``encode_image`` makes them) and prompt embeddings."""
    pipe = StableDiffusionPipeline(vae=None, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                   unet=prior.denoiser, scheduler=prior.scheduler, safety_checker=None,
                                   feature_extractor=None, image_encoder=prior.image_encoder,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    raw = conditions()
    cond = prior.encode_condition(raw)
    prompts = [str(r) for r in raw]
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, "cpu", 1, True)
        img_pos, img_neg = pipe.encode_image(prior.preprocess_images([raw[0]["image"]]), "cpu", 1)
    assert torch.allclose(pos, cond.tensors["encoder_hidden_states"])
    assert torch.allclose(img_pos, cond.tensors["image_embeds"][0]) and not img_neg.any()
    # the pipeline's UNet call at one step (x2 for CFG, image embeds as prepare_ip_adapter_image_embeds lays them out)
    embeds = pipe.prepare_ip_adapter_image_embeds(
        None, [torch.cat([torch.zeros_like(cond.tensors["image_embeds"]), cond.tensors["image_embeds"]])], "cpu", 1,
        True)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    t = prior.timesteps[1]
    with torch.no_grad():
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, pos]),
                        added_cond_kwargs={"image_embeds": embeds}, return_dict=False)[0]
        u, c = out.chunk(2)
        assert torch.allclose(prior.predict_noise_at(x, t, cond), u + prior.guidance_scale * (c - u), atol=1e-6)
        # a whole DDIM sample (pixel space: the pipeline's latents are our states), row by row: the pipeline shares
        # one reference image across its batch, we take one per row
        x_T = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
        ref = torch.cat([pipe(
            prompt_embeds=pos[i:i + 1], negative_prompt_embeds=neg[i:i + 1], num_inference_steps=prior.num_steps,
            guidance_scale=prior.guidance_scale, eta=0.0, latents=x_T[i:i + 1].clone(), output_type="latent",
            ip_adapter_image_embeds=[torch.cat([torch.zeros(1, 1, 16), cond.tensors["image_embeds"][i:i + 1]])],
        ).images for i in range(3)])
        ours = prior.sample(cond, x_T=x_T.clone())
    assert (ours - ref).abs().max() <= 1e-5


def test_preprocessing_matches_clip_image_processor(prior):
    from PIL import Image
    from transformers import CLIPImageProcessor

    img = images(1, seed=5, size=24)[0]
    ours = prior.preprocess_images([img])
    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    proc = CLIPImageProcessor(size=SIZE, crop_size=SIZE)  # what diffusers' load_ip_adapter builds
    ref = torch.as_tensor(np.asarray(proc(pil, return_tensors="np").pixel_values))
    assert ours.shape == ref.shape == (1, 3, SIZE, SIZE)
    assert (ours - ref).abs().mean() < 0.03


def test_embedded_layout_round_trip(prior, saved):
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "models/image_encoder"):
        assert (saved / sub).is_dir(), sub
    with safe_open(str(saved / "models" / IP_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
    assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
    unet_config = json.loads((saved / "unet" / "config.json").read_text())
    assert unet_config["encoder_hid_dim_type"] is None  # the base UNet; the IP-Adapter lives in models/
    with safe_open(str(saved / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "encoder_hid_proj" in k or "_ip." in k]
    assert has_ip_adapter(prior.denoiser)  # saving put the layers back
    loaded = MultiViewPrior(str(saved), num_steps=4, guidance_scale=2.0)  # ip_adapter "auto": the folder's own
    assert loaded.has_ip_adapter and isinstance(loaded, ImagePrompted)
    assert torch.equal(eps(loaded, conditions()), eps(prior, conditions()))


def test_h94_layout_stand_in_loads_with_the_ip_adapter_arguments(prior, saved, tmp_path):
    """A base SD folder and a separate IP-Adapter repo (models/ip-adapter_sd15.safetensors, models/image_encoder/)."""
    sd, repo = tmp_path / "sd", tmp_path / "ip_repo"
    shutil.copytree(saved, sd, ignore=shutil.ignore_patterns("models"))
    (repo / "models").mkdir(parents=True)
    shutil.copy(saved / "models" / IP_WEIGHTS, repo / "models" / "ip-adapter_custom.safetensors")
    shutil.copytree(saved / "models" / "image_encoder", repo / "models" / "encoder")
    g = MultiViewPrior(str(sd), ip_adapter=str(repo), ip_adapter_subfolder="models",
                       ip_adapter_weight_name="ip-adapter_custom.safetensors", image_encoder_folder="encoder",
                       num_steps=4, guidance_scale=2.0)
    assert torch.equal(eps(g, conditions()), eps(prior, conditions()))
    plain = MultiViewPrior(str(sd), num_steps=4, guidance_scale=2.0)  # "auto" finds no IP-Adapter there
    assert not plain.has_ip_adapter and set(plain.encode_condition(["a red cube"]).tensors) == {"encoder_hidden_states"}
    with pytest.raises(FileNotFoundError, match="ip-adapter_sd15.safetensors"):
        MultiViewPrior(str(sd), ip_adapter=str(repo))  # the default weight name is not in this repo
    with pytest.raises(FileNotFoundError, match="generator.ip_adapter: no folder"):
        MultiViewPrior(str(sd), ip_adapter=str(tmp_path / "missing"))


def test_text_only_prior_rejects_image_prompts_clearly(saved):
    g = MultiViewPrior(str(saved), ip_adapter=None, num_steps=4, guidance_scale=2.0)
    assert not g.has_ip_adapter
    assert eps(g, ["a red cube"]).shape == (1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="without an IP-Adapter.*generator.ip_adapter"):
        g.encode_condition([ImagePrompt("a red cube", images(1)[0])])


def test_bad_conditions_are_clear_errors(prior):
    with pytest.raises(ValueError, match=r"condition 1: the reference image must be a \(3, H, W\) tensor"):
        prior.encode_condition(["a red cube", {"prompt": "a red cube", "image": torch.rand(1, 3, SIZE, SIZE)}])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        prior.encode_condition([ImagePrompt("a red cube", images(1)[0] * 255)])
    with pytest.raises(TypeError, match="condition 0: expected a prompt"):
        prior.encode_condition([3])
    with pytest.raises(TypeError, match="a list"):
        prior.encode_condition("a red cube")


def test_mismatched_components_are_rejected(prior):
    c = dict(unet=prior.denoiser, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer, scheduler=prior.scheduler)
    with pytest.raises(ValueError, match="IP-Adapter layers on the UNet and an image encoder"):
        MultiViewPrior.from_components(**c, lora_rank=None)
    with pytest.raises(ValueError, match="unknown embedded"):
        MultiViewPrior("embedded:nope")
    assert "embedded:tiny-multiview-prior" in EMBEDDED


def test_lora_leaves_the_ip_adapter_and_image_encoder_frozen():
    g = tiny(lora_rank=4)
    names = [n for n, p in g.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not [n for n in names if "_ip" in n or "encoder_hid_proj" in n or "image_encoder" in n]


def test_frozen_copy_follows_the_image_prompt_scale():
    g = tiny(lora_rank=None, full_finetune=True)
    g.image_prompt_scale = 0.0
    with g.base_model():
        assert torch.equal(eps(g, [ImagePrompt("a red cube", images(1)[0])]), eps(g, ["a red cube"]))


def test_pretraining_exports_a_folder_the_prior_loads(tmp_path):
    m = TinyMultiViewPriorPretraining(size=SIZE, channels=[8, 16], plain_levels=1, patch_size=8, image_hidden=16,
                                      image_embed_dim=16, ema_decay=None)
    assert {n.split(".")[0] for n, p in m.generator.named_parameters() if p.requires_grad} == \
        {"denoiser", "text_encoder", "image_encoder"}
    batch = {"image": torch.rand(4, 3, SIZE, SIZE), "front": torch.rand(4, 3, SIZE, SIZE),
             "prompt": ["a red cube, side view"] * 4}
    m._loss(batch).backward()
    ip_grads = [p.grad for n, p in m.generator.denoiser.named_parameters() if "to_k_ip" in n or "encoder_hid_proj" in n]
    assert ip_grads and all(g is not None for g in ip_grads)
    m.save_weights(tmp_path)
    g = MultiViewPrior(str(tmp_path), num_steps=4, guidance_scale=2.0)
    m.generator.guidance_scale = 2.0
    m.generator.eval()
    assert torch.allclose(eps(g, conditions()), eps(m.generator, conditions()))
