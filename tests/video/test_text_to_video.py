"""TextToVideoGenerator: parity with diffusers' TextToVideoSDPipeline, loading by path, LoRA in the
pipeline's format, shapes, GIFs, and Free²Guide / Best-of-N counts on videos."""

import pytest
import torch
from diffusers import AutoencoderKL, TextToVideoSDPipeline

from domains.images.tiny import tiny_scheduler, tiny_text_encoder
from domains.video.text_to_video import TextToVideoGenerator
from domains.video.tiny import build_tiny_video_generator, build_tokenizer, tiny_unet3d
from rewardopt.methods.best_of_n import BestOfN
from rewardopt.methods.free2guide import Free2Guide
from rewardopt.methods.smc import SMC
from rewardopt.methods.svdd import SVDD
from rewardopt.rewards.base import Reward
from rewardopt.testing.contracts import GeneratorContract

PROMPTS = ["a red circle moving left", "two blue squares moving up", "a green triangle moving down"]


def tiny_video(**kw):
    kw.setdefault("num_steps", 3)
    kw.setdefault("guidance_scale", 2.0)
    kw.setdefault("lora_rank", None)
    return build_tiny_video_generator(seed=0, size=16, frames=4, channels=(8, 16), **kw)


class TestTextToVideoGeneratorContract(GeneratorContract):
    raw_conditions = PROMPTS[:2]

    @pytest.fixture
    def make_generator(self):
        return lambda: tiny_video(lora_rank=2)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny latent-space TextToVideoSDPipeline (VAE + UNet3D + CLIP), saved with save_pretrained."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=16)
    unet = tiny_unet3d(8, in_channels=4, channels=(8, 16)).eval()
    pipe = TextToVideoSDPipeline(vae=vae.eval(), text_encoder=tiny_text_encoder(len(tok)).eval(), tokenizer=tok,
                                 unet=unet, scheduler=tiny_scheduler())
    path = tmp_path_factory.mktemp("t2v") / "pipe"
    pipe.save_pretrained(path)
    return path


def test_sampling_matches_text_to_video_pipeline(pipeline_dir):
    """Same x_T, DDIM (η = 0), CFG 3: our states and decoded videos equal the pipeline's to 1e-5."""
    pipe = TextToVideoSDPipeline.from_pretrained(pipeline_dir)
    gen = TextToVideoGenerator(str(pipeline_dir), num_frames=5, height=16, width=16, num_steps=6,
                               guidance_scale=3.0, lora_rank=None)
    assert gen.vae is not None and gen.latent_shape == (4, 5, 8, 8)
    x_T = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = dict(num_inference_steps=6, guidance_scale=3.0, num_frames=5, height=16, width=16)
    with torch.no_grad():
        ref = pipe(PROMPTS[:2], latents=x_T.clone(), output_type="latent", **kw).frames
        ours = gen.sample(gen.encode_condition(PROMPTS[:2]), x_T=x_T.clone())
        ref_video = pipe(PROMPTS[:2], latents=x_T.clone(), output_type="pt", **kw).frames
        our_video = gen.decode(ours)
    assert ours.shape == ref.shape == (2, 4, 5, 8, 8)
    assert (ours - ref).abs().max() <= 1e-5
    assert our_video.shape == ref_video.shape == (2, 5, 3, 16, 16)  # (B, F, C, H, W)
    assert (our_video - ref_video).abs().max() <= 1e-5
    assert gen.counter.nfe == 2 * 6 and gen.counter.decodes == 2


def test_lora_saved_in_peft_format_loads_into_text_to_video_pipeline_unet(pipeline_dir, tmp_path):
    """The adapter file (peft's format) put into the pipeline's own UNet3D with peft reproduces our samples;
    and ``load_lora`` into a fresh generator gives the same model."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    gen = TextToVideoGenerator(str(pipeline_dir), num_frames=3, height=16, width=16, num_steps=2,
                               guidance_scale=4.0, lora_rank=4)
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.normal_(0, 0.3)
    path = gen.save_lora(tmp_path / "adapter")
    assert path.is_file() and path.name == "adapter_model.safetensors"
    pipe = TextToVideoSDPipeline.from_pretrained(pipeline_dir)
    x_T = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=2, guidance_scale=4.0, num_frames=3, height=16, width=16, output_type="latent")
    with torch.no_grad():
        before = pipe(PROMPTS[:1], latents=x_T.clone(), **kw).frames
        inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "adapter")), pipe.unet)
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
        set_peft_model_state_dict(pipe.unet, state)
        after = pipe(PROMPTS[:1], latents=x_T.clone(), **kw).frames
        ours = gen.sample(gen.encode_condition(PROMPTS[:1]), x_T=x_T.clone())
        fresh = TextToVideoGenerator(str(pipeline_dir), num_frames=3, height=16, width=16, num_steps=2,
                                     guidance_scale=4.0, lora_rank=None)
        fresh.load_lora(tmp_path / "adapter")
        reloaded = fresh.sample(fresh.encode_condition(PROMPTS[:1]), x_T=x_T.clone())
    assert not torch.allclose(before, after)
    assert (after - ours).abs().max() < 1e-4
    assert (reloaded - ours).abs().max() < 1e-5


def test_save_pretrained_roundtrip_and_errors(tmp_path):
    g = tiny_video()
    g.save_pretrained(tmp_path / "m")
    h = TextToVideoGenerator(str(tmp_path / "m"), num_frames=4, height=16, width=16, num_steps=3,
                             guidance_scale=2.0, lora_rank=None)
    x_T = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = g.sample(g.encode_condition(PROMPTS[:2]), x_T=x_T)
        b = h.sample(h.encode_condition(PROMPTS[:2]), x_T=x_T)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        TextToVideoGenerator(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown embedded video model"):
        TextToVideoGenerator("embedded:nope")
    with pytest.raises(ValueError, match="num_frames"):
        tiny_video(num_frames=0)
    with pytest.raises(ValueError, match="videos must be"):
        g.encode_videos(torch.rand(2, 4, 3, 8, 8))


def test_decode_encode_shapes_and_key_frame_render():
    g = tiny_video()
    videos = torch.rand(2, 4, 3, 16, 16)
    x0 = g.encode_videos(videos)
    assert x0.shape == (2, 3, 4, 16, 16)
    assert torch.allclose(g.decode(x0), videos, atol=1e-6)  # pixel space: decode inverts encode
    pics = g.render(videos)
    assert pics.shape == (2, 3, 16, 4 * 16 + 3)  # 4 key frames, 1-px white gaps
    assert torch.equal(pics[1, :, :, 17:33], videos[1, 1])  # key frames of 4 are 0, 1, 2, 3


def test_write_samples_writes_one_gif_per_video_with_every_frame(tmp_path):
    from PIL import Image

    g = tiny_video()
    videos = torch.zeros(2, 4, 3, 16, 16)
    for f in range(4):
        videos[:, f, 0] = f / 3  # red ramps up frame by frame
    paths = [p for p in g.write_samples(videos, tmp_path, "s") if p.suffix == ".gif"]
    assert [p.name for p in paths] == ["s_000.gif", "s_001.gif"]
    im = Image.open(paths[0])
    assert im.n_frames == 4
    reds = []
    for f in range(4):
        im.seek(f)
        reds.append(im.convert("RGB").getpixel((0, 0))[0])
    assert reds == sorted(reds) and reds[0] < 10 < 245 < reds[-1]


class Brightness(Reward):
    """Mean brightness of a video: a cheap differentiable stand-in reward."""

    differentiable = True

    def score(self, samples, cond=None):
        return samples.mean(dim=(1, 2, 3, 4))


WIDTH_ONE = {
    "best_of_n": (BestOfN, {"n": 1}),
    "svdd": (SVDD, {"num_children": 1}),
    "smc": (SMC, {"num_particles": 1}),
    "free2guide": (Free2Guide, {"num_candidates": 1, "guide_steps": 2}),
}


@pytest.mark.parametrize("name", list(WIDTH_ONE))
def test_width_one_is_the_plain_video_sampler(name):
    g = tiny_video(eta=1.0)
    cls, kw = WIDTH_ONE[name]
    m = cls(g, Brightness(), seed=5, save_samples=False, **kw)
    got, _ = m.generate(PROMPTS[:2], batch_idx=0)
    rng, _ = m.rngs(0)
    with torch.no_grad():
        plain = g.decode(g.sample(g.encode_condition(PROMPTS[:2]), generator=rng))
    assert got.shape == (2, 4, 3, 16, 16)
    assert torch.equal(got, plain)


def test_free2guide_judge_calls_on_video_are_candidates_times_guided_steps():
    """Through the HTTP judge: n candidates at each of the guided steps, each a key-frame grid PNG; the
    counted NFE and reward calls are the analytic expected cost."""
    from rewardopt.rewards.judges import OpenAIJudge
    from rewardopt.testing.judge_server import JudgeServer

    g = tiny_video(eta=1.0, num_steps=4)
    with JudgeServer() as srv:
        judge = OpenAIJudge(base_url=srv.base_url, model="local", api_key_env=None, cache_size=0)
        m = Free2Guide(g, judge, num_candidates=3, guide_steps=2, seed=0, save_samples=False)
        n0, c0 = g.counter.nfe, judge.calls
        out, _ = m.generate(PROMPTS[:2], batch_idx=0)
        assert out.shape == (2, 4, 3, 16, 16)
        assert judge.calls - c0 == 2 * 3 * 2  # prompts x candidates x guided steps
        assert srv.requests == 2 * 3 * 2
        exp = m.expected_cost()
        assert exp["reward_calls"] == 3 * 2
        assert g.counter.nfe - n0 == 2 * exp["nfe"] == 2 * (4 + (3 - 1) * 2)  # T, plus n - 1 per guided step


def test_ddim_eta_one_step_on_video_states_matches_the_scheduler():
    """The steering recipes' sampler (η = 1) on (B, C, F, h, w) states: each step equals diffusers'
    ``DDIMScheduler.step(eta=1, variance_noise=...)`` applied to the same state (the pipeline's frame
    reshape around it changes no number: the step is elementwise)."""
    from diffusers import DDIMScheduler

    g = tiny_video(eta=1.0, num_steps=4)
    cond = g.encode_condition(PROMPTS[:2])
    sched = DDIMScheduler.from_config(g.scheduler.config)
    sched.set_timesteps(4)
    x = g.init_state(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            noise = torch.randn_like(x)
            out = g.model_output(x, i, cond)
            ref = sched.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
            assert (g.step(x, i, cond, noise=noise, out=out) - ref).abs().max() <= 1e-5, f"step {i}"
            x = ref


@pytest.mark.parametrize("name,kw", [("best_of_n", {"n": 3}), ("svdd", {"num_children": 2})])
def test_counted_compute_on_video_equals_the_expected_cost(name, kw):
    g = tiny_video(eta=1.0, num_steps=3)
    cls = {"best_of_n": BestOfN, "svdd": SVDD}[name]
    r = Brightness()
    m = cls(g, r, seed=0, save_samples=False, **kw)
    c0, r0 = m.counts(), r.calls
    m.generate(PROMPTS[:2], batch_idx=0)
    c1, exp = m.counts(), m.expected_cost()
    assert c1["nfe"] - c0["nfe"] == 2 * exp["nfe"]
    assert r.calls - r0 == 2 * exp["reward_calls"] > 2
    assert c1["decodes"] - c0["decodes"] == 2 * exp["decodes"]
