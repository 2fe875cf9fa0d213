"""Score distillation: the SDS gradient is w(t)(ε̂ − ε) with no UNet Jacobian, the guided ε̂ is the prior's, counted
compute is exact, rewards on renders move the scene, and VP-SDS conditions on a visual prompt."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from domains.images.rewards import ColourReward
from domains.images.tiny import build_tiny_generator
from domains.text_to_3d.scene import VoxelScene
from rewardopt.methods.sds import SDS, VIEWS, VPSDS, sds_loss


def tiny_prior(prediction_type="epsilon", guidance_scale=3.0):
    return build_tiny_generator(seed=0, size=16, channels=(8, 16), prediction_type=prediction_type, lora_rank=None,
                                guidance_scale=guidance_scale, num_steps=4)


def fit(module, steps):
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_sds_gradient_is_weighted_noise_residual_without_the_unet_jacobian(prediction_type):
    g = tiny_prior(prediction_type)
    m = SDS(g, VoxelScene(resolution=8, render_size=16, num_samples=16), "a red circle", guidance_scale=7.5,
            views_per_step=3)
    on_graph = []  # per UNet call: whether its output is on the autograd graph (so a backward would go through it)
    g.denoiser.register_forward_hook(lambda mod, args, out: on_graph.append(out[0].requires_grad))
    rng = torch.Generator().manual_seed(0)
    views = m.scene.random_views(3, rng)
    images = m.scene.render(views, rng)
    images.retain_grad()
    terms = m.distillation_terms(images, m.scene.view_names(views), rng)
    terms["loss"].backward()
    w = 1 - g.alphas_cumprod[terms["t"]]
    expected = w.reshape(-1, 1, 1, 1) * (terms["eps_hat"] - terms["noise"]) / 3
    # pixel-space prior: x = 2 * image - 1, so dL/dimage = 2 dL/dx
    torch.testing.assert_close(images.grad, 2 * expected, rtol=1e-5, atol=1e-7)
    assert on_graph and not any(on_graph) and g.counter.nfe_grad == 0
    assert all(p.grad is None for p in g.parameters())
    assert m.scene.grid.density_raw.grad is not None and m.scene.grid.density_raw.grad.abs().sum() > 0
    # positive control: the hook sees a UNet call on the graph when there is one (so the check above can fail)
    probe = terms["x"].detach().requires_grad_(True)
    cond_t = m.view_conditions(m.scene.view_names(views)).tensors["encoder_hidden_states"]
    g.denoiser(probe, terms["t"], encoder_hidden_states=cond_t)
    assert on_graph[-1] is True

    # the guided ε̂, recomputed by hand: CFG on the UNet's own outputs at each row's t, converted to ε
    a = g.alphas_cumprod[terms["t"]].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * terms["x"].detach() + (1 - a).sqrt() * terms["noise"]
    cond = m.view_conditions(m.scene.view_names(views)).tensors["encoder_hidden_states"]
    uncond = g._embed([""]).expand(3, -1, -1)
    with torch.no_grad():
        out_c = g.denoiser(x_t, terms["t"], encoder_hidden_states=cond).sample
        out_u = g.denoiser(x_t, terms["t"], encoder_hidden_states=uncond).sample
    out = out_u + 7.5 * (out_c - out_u)
    eps = {"epsilon": out, "sample": (x_t - a.sqrt() * out) / (1 - a).sqrt(),
           "v_prediction": a.sqrt() * out + (1 - a).sqrt() * x_t}[prediction_type]
    # x0 -> ε divides by sqrt(1 - ᾱ_t): batched-vs-separate UNet rounding (~1e-7) grows to ~1e-5 at small t
    torch.testing.assert_close(terms["eps_hat"], eps, rtol=1e-4, atol=1e-5 if prediction_type == "epsilon" else 1e-4)


def test_sds_loss_gradient_formula():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    eps_hat, noise, w = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.rand(4)
    sds_loss(x, eps_hat, noise, w).backward()
    torch.testing.assert_close(x.grad, w.reshape(-1, 1, 1, 1) * (eps_hat - noise) / 4)


def test_timesteps_view_prompts_and_guidance_are_the_method_s():
    g = tiny_prior(guidance_scale=3.0)
    m = SDS(g, VoxelScene(resolution=8, render_size=16, num_samples=8), "a red circle", guidance_scale=50.0,
            t_range=(0.2, 0.6))
    rng = torch.Generator().manual_seed(3)
    ts = torch.cat([m.distillation_terms(torch.rand(16, 3, 16, 16), ["front"] * 16, rng)["t"] for _ in range(6)])
    assert ts.min() >= 200 and ts.max() <= 600 and ts.unique().numel() > 50
    assert g.guidance_scale == 3.0  # restored after each distillation call
    assert m.raw_condition("back") == "a red circle, back view"
    assert m.view_conditions(["side", "front"]).raw == ["a red circle, side view", "a red circle, front view"]
    assert SDS(g, m.scene, "a red circle", view_dependent=False).raw_condition("back") == "a red circle"
    with pytest.raises(ValueError, match="view-dependent prompting knows"):
        m.view_conditions(["below"])
    assert list(VIEWS) == ["front", "side", "back", "overhead"]


def test_counted_prior_nfe_is_views_times_steps_and_rewards_train_the_scene(tmp_path):
    g = tiny_prior()
    reward = ColourReward("red")
    scene = VoxelScene(resolution=8, render_size=16, num_samples=16)
    m = SDS(g, scene, "a red circle", views_per_step=2, rewards=[reward], reward_weights=[5.0], lr=0.1,
            output_dir=str(tmp_path))
    before = m.evaluation()["rewards"][reward.name]
    fit(m, 6)
    assert m.prior_nfe == 12 == g.counter.nfe and g.counter.nfe_grad == 0
    assert reward.calls == 12
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["prior_nfe"] == 12 and summary["reward_calls"] == {reward.name: 12} and summary["steps"] == 6
    assert (tmp_path / "turntable.gif").is_file() and (tmp_path / "views.png").is_file()
    # rewards alone (no SDS term) move the scene toward the reward
    m2 = SDS(tiny_prior(), VoxelScene(resolution=8, render_size=16, num_samples=16), "a red circle", sds_weight=0.0,
             rewards=[ColourReward("red")], lr=0.2, output_dir=str(tmp_path / "r"))
    fit(m2, 15)
    after = m2.evaluation()["rewards"]["colour_red"]
    assert after > before + 0.1, (before, after)
    assert m2.prior_nfe == 0


def test_bad_configurations_are_refused():
    g = tiny_prior()
    scene = VoxelScene(resolution=8)
    with pytest.raises(ValueError, match="t_range"):
        SDS(g, scene, "x", t_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="reward_weights"):
        SDS(g, scene, "x", rewards=[ColourReward("red")], reward_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="Scene"):
        SDS(g, torch.nn.Linear(2, 2), "x")
    with pytest.raises(ValueError, match="non-empty"):
        SDS(g, scene, " ")
    with pytest.raises(TypeError, match="ImagePrompted"):
        VPSDS(g, scene, "x")


def tiny_image_prior():
    from domains.text_to_3d.tiny import build_tiny_prior

    return build_tiny_prior(seed=0, size=16, channels=(8, 16), plain_levels=1, num_steps=3, guidance_scale=3.0)


def test_vpsds_draws_its_visual_prompt_from_the_text_first_and_conditions_every_view_on_it(tmp_path):
    from rewardopt.generators.capabilities import ImagePrompt

    g = tiny_image_prior()
    scene = VoxelScene(resolution=8, render_size=16, num_samples=8)
    m = VPSDS(g, scene, "a red cube", views_per_step=2, visual_prompt_seed=5, output_dir=str(tmp_path))
    vp = m.ensure_visual_prompt()
    assert vp.shape == (3, 16, 16) and m.visual_prompt_nfe == 3  # one text-only sample: num_steps NFE
    cond = g.encode_condition(["a red cube, front view"])
    expected = g.decode(g.sample(cond, generator=torch.Generator().manual_seed(5), grad_last_k=0))[0]
    torch.testing.assert_close(vp, expected)
    raw = m.raw_condition("back")
    assert isinstance(raw, ImagePrompt) and str(raw) == "a red cube, back view" and raw["image"] is vp
    c = m.view_conditions(["front", "side", "back"])
    emb = c.tensors["image_embeds"]
    assert emb.abs().sum() > 0 and torch.equal(emb[0], emb[1]) and torch.equal(emb[1], emb[2])
    assert isinstance(m.reward_condition(), ImagePrompt) and str(m.reward_condition()) == "a red cube"
    nfe_before = g.counter.nfe
    fit(m, 2)
    assert m.prior_nfe == 4 and g.counter.nfe - nfe_before == 4 and m.visual_prompt_nfe == 3  # not drawn again
    import json

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["visual_prompt_nfe"] == 3 and s["prior_nfe"] == 4 and s["method"] == "VPSDS"

    # generated at fit start (after the module is on its device), from the plain prompt without view-dependence
    plain = VPSDS(g, scene, "a red cube", views_per_step=2, visual_prompt_seed=5, view_dependent=False,
                  output_dir=str(tmp_path / "plain"))
    assert plain.visual_prompt.numel() == 0
    fit(plain, 1)
    expected = g.decode(g.sample(g.encode_condition(["a red cube"]), generator=torch.Generator().manual_seed(5),
                                 grad_last_k=0))[0]
    torch.testing.assert_close(plain.visual_prompt, expected)


def test_vpsds_resume_keeps_the_visual_prompt_and_its_count(tmp_path):
    """A resumed run restores the generated visual prompt from the checkpoint: not drawn (nor charged) again."""
    g = tiny_image_prior()

    def run(steps, ckpt=None, seed=5):
        m = VPSDS(g, VoxelScene(resolution=8, render_size=16, num_samples=8), "a red cube", views_per_step=2,
                  visual_prompt_seed=seed, output_dir=str(tmp_path / "out"))
        L.Trainer(max_steps=steps, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu").fit(m, ckpt_path=ckpt)
        return m

    first = run(2)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    nfe = g.counter.nfe
    resumed = run(3, ckpt=str(ckpt), seed=6)  # another seed would draw another image: the checkpoint's wins
    assert resumed.visual_prompt_nfe == first.visual_prompt_nfe == 3
    torch.testing.assert_close(resumed.visual_prompt, first.visual_prompt)
    assert g.counter.nfe - nfe == 2 and resumed.prior_nfe == 6  # one more step of 2 views; no text-to-image pass


def test_stylised_mode_reads_the_reference_image(tmp_path):
    from PIL import Image

    ref = torch.zeros(40, 30, 3, dtype=torch.uint8)
    ref[..., 2] = 255  # a blue picture, not square
    Image.fromarray(ref.numpy()).save(tmp_path / "ref.png")
    g = tiny_image_prior()
    m = VPSDS(g, VoxelScene(resolution=8, render_size=16, num_samples=8), "a red cube",
              visual_prompt=str(tmp_path / "ref.png"))
    vp = m.ensure_visual_prompt()
    assert vp.shape == (3, 16, 16) and m.visual_prompt_nfe == 0
    assert vp[2].min() > 0.99 and vp[:2].max() < 0.01
    with pytest.raises(FileNotFoundError, match="no image"):
        VPSDS(g, m.scene, "a red cube", visual_prompt=str(tmp_path / "missing.png"))
