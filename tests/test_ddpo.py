"""DDPO against the reference code's behaviour (kvablack/ddpo-pytorch): bf16 rewards, per-sample
timestep subsets, inner epochs, statistics gathered across processes, exact multi-process resume,
and no wasted recomputation."""

import json
import subprocess
import sys
from collections import defaultdict, deque
from contextlib import nullcontext

import lightning as L
import numpy as np
import pytest
import torch

from domains.images.rewards import JpegCompressibilityReward
from rewardopt.data import PromptDataModule
from rewardopt.methods.ddpo import DDPO, normalize_per_prompt, sample_timestep_mask
from rewardopt.rewards.base import Reward
from tests.conftest import ROOT, tiny_generator

TRAIN = ["one red circle", "two blue squares", "three green triangles", "one yellow square"]
VAL = ["two red circles"]


def fit(method, steps, tmp_path, batch_size=2, **kw):
    """Train for ``steps`` optimiser steps; the held-out evaluation before/after is skipped (not tested here)."""
    method.evaluate = lambda loader=None: 0.0
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path), **kw)
    data = PromptDataModule(TRAIN, VAL, batch_size=batch_size, val_batch_size=1, val_repeats=1, epoch_size=64)
    trainer.fit(method, datamodule=data)
    return trainer


class Bf16Brightness(Reward):
    """A neural-looking reward whose output is bf16, as a reward model run under bf16-mixed returns."""

    differentiable = False

    def score(self, samples, cond):
        return samples.mean(dim=(1, 2, 3)).to(torch.bfloat16)


def test_ddpo_takes_a_bf16_reward(tmp_path):
    # before: TypeError "Got unsupported ScalarType BFloat16" from r.total.cpu().numpy()
    m = DDPO(tiny_generator(eta=1.0), Bf16Brightness(), samples_per_prompt=2, num_minibatches=1, lr=1e-2,
             clip_range=0.2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in m.generator.trainable_parameters()]
    fit(m, 1, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator.trainable_parameters()))
    assert all(b.maxlen == 16 for b in m.buffers.values()) and sum(len(b) for b in m.buffers.values()) == 4


def test_reference_defaults():
    m = DDPO(tiny_generator(eta=1.0), JpegCompressibilityReward())
    assert (m.timestep_fraction, m.num_inner_epochs, m.buffer_size, m.min_count) == (1.0, 1, 16, 16)
    assert (m.clip_range, m.adv_clip, m.lr) == (1e-4, 5.0, 3e-4)


def test_sample_timestep_mask_draws_k_of_the_steps_per_sample_uniformly():
    rng = torch.Generator().manual_seed(0)
    mask = sample_timestep_mask(4000, 5, 2, rng)
    assert mask.shape == (4000, 5) and (mask.sum(1) == 2).all()
    assert torch.allclose(mask.float().mean(0), torch.full((5,), 0.4), atol=0.03)  # each step 2/5 of the time
    pairs = {tuple(row.nonzero().flatten().tolist()) for row in mask}
    assert len(pairs) == 10, "every 2-subset of 5 steps occurs: the subset is drawn per sample"
    assert sample_timestep_mask(3, 5, 5, rng).all()


def test_timestep_fraction_trains_that_fraction_of_each_trajectory(tmp_path):
    g = tiny_generator(eta=1.0, num_steps=4)
    m = DDPO(g, JpegCompressibilityReward(), samples_per_prompt=2, num_minibatches=1, timestep_fraction=0.5,
             output_dir=str(tmp_path))
    rows_per_call = []
    transition = g.transition

    def recording(x, i, cond, out=None):
        if torch.is_grad_enabled():
            rows_per_call.append(len(x))
        return transition(x, i, cond, out=out)

    g.transition = recording
    fit(m, 1, tmp_path)
    n, k = 4, 2  # 2 prompts x 2 samples, int(4 * 0.5) steps each
    assert g.counter.nfe_grad == n * k and sum(rows_per_call) == n * k
    assert len(rows_per_call) <= 4 and max(rows_per_call) <= n
    with pytest.raises(ValueError, match="timestep_fraction"):
        DDPO(g, JpegCompressibilityReward(), timestep_fraction=0.1)  # int(4 * 0.1) = 0 steps


def test_grouped_timesteps_give_the_reference_per_column_gradient():
    """Ours: one denoiser call per timestep over the rows that drew it. The reference: one call per
    shuffled timestep column, loss mean over the minibatch, accumulated over k columns / k."""
    torch.manual_seed(0)
    g = tiny_generator(eta=1.0, num_steps=4)
    m = DDPO(g, JpegCompressibilityReward(), clip_range=1e-3)
    m.manual_backward = lambda loss: loss.backward()
    m._backward_sync = lambda sync: nullcontext()
    cond = g.encode_condition(TRAIN)
    states, old = m.sample_trajectories(cond, torch.Generator().manual_seed(1))
    with torch.no_grad():  # perturb the policy so ratios differ from 1 and some get clipped
        for p in g.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    rows = torch.tensor([2, 0, 3])
    steps, k = [0, 1, 2, 3], 2
    mask = sample_timestep_mask(3, 4, k, torch.Generator().manual_seed(2))
    params = g.trainable_parameters()
    for p in params:
        p.grad = None
    stats = m.train_minibatch(states, old, adv, cond, rows, mask, steps, k)
    assert 0 < stats["clipped"] < stats["pairs"] == 3 * k, "some ratios clipped, some not"
    ours = [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    chosen = [mask[j].nonzero().flatten().tolist() for j in range(len(rows))]  # each row's k timesteps
    for col in range(k):
        total = 0.0
        for j, row in enumerate(rows.tolist()):
            i = steps[chosen[j][col]]
            logp = g.log_prob(states[i][[row]], i, states[i + 1][[row]], cond.index([row]))  # one row per call
            ratio = torch.exp(logp - old[i][[row]])
            a = adv[[row]]
            total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - 1e-3, 1 + 1e-3)).sum()
        (total / len(rows) / k).backward()
    for a, b in zip(ours, (p.grad for p in params)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_num_inner_epochs_passes_over_each_sampled_batch_again(tmp_path):
    g = tiny_generator(eta=1.0, num_steps=4)
    m = DDPO(g, JpegCompressibilityReward(), samples_per_prompt=2, num_minibatches=2, num_inner_epochs=2,
             output_dir=str(tmp_path))
    trainer = fit(m, 4, tmp_path)  # 2 minibatches x 2 inner epochs = 4 optimiser steps for one sampled batch
    assert trainer.global_step == 4
    assert g.counter.samples == 4, "one sampled batch"
    assert g.counter.nfe_grad == 2 * 4 * 4, "every sample, every step, twice"
    assert g.counter.nfe == 4 * 4 + 2 * 4 * 4


def test_training_forwards_skip_gradient_checkpointing(tmp_path):
    """Each training forward's backward follows at once: recomputing it in backward is a wasted NFE."""
    g = tiny_generator(eta=1.0, num_steps=4, gradient_checkpointing=True)
    m = DDPO(g, JpegCompressibilityReward(), samples_per_prompt=2, num_minibatches=2, output_dir=str(tmp_path))
    calls = []
    denoise = g._denoiser_output
    g._denoiser_output = lambda *a, **k: calls.append(torch.is_grad_enabled()) or denoise(*a, **k)
    fit(m, 2, tmp_path)
    # sampling: 4 calls without grad; training: 2 minibatches x 4 steps, each run once (not twice)
    assert calls.count(False) == 4 and calls.count(True) == 8, calls
    assert g.gradient_checkpointing, "the generator's own setting is restored"


def test_excluded_samples_get_zero_advantage_and_stay_out_of_the_statistics():
    buffers = defaultdict(lambda: deque(maxlen=8))
    adv = normalize_per_prompt(["a", "a", "a", "b"], np.array([1.0, -np.inf, 3.0, 5.0]), buffers, min_count=2)
    assert np.isfinite(adv).all() and adv[1] == 0.0
    assert np.allclose(adv[[0, 2]], [-1, 1], atol=1e-5)
    assert list(buffers["a"]) == [1.0, 3.0]


DDP_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from domains.images.rewards import JpegCompressibilityReward
from rewardopt.data import PromptDataModule
from rewardopt.methods.ddpo import DDPO
from tests.conftest import tiny_generator

out = Path(sys.argv[1])


class Recording(DDPO):
    def advantages(self, prompts, rewards):
        adv = super().advantages(prompts, rewards)
        self.record.append({{"step": self.global_step, "prompts": prompts, "rewards": rewards.tolist(),
                            "adv": adv.tolist()}})
        return adv


def run(phase):
    torch.manual_seed(0)
    m = Recording(tiny_generator(eta=1.0, num_steps=3), JpegCompressibilityReward(), samples_per_prompt=2,
                  num_minibatches=1, min_count=4, clip_range=0.2, lr=1e-2, output_dir=str(out / phase))
    m.record, m.evaluate = [], lambda loader=None: 0.0
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{{step}}")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        callbacks=[ckpt] if phase == "straight" else [], enable_checkpointing=phase == "straight",
                        enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(out))
    # several prompts: a resumed run must give every rank the prompts the uninterrupted run gave it
    data = PromptDataModule(["one red circle", "two blue squares", "three green triangles", "one white circle"],
                            ["one red circle"], batch_size=2, val_batch_size=1, val_repeats=1, epoch_size=64)
    trainer.fit(m, datamodule=data, ckpt_path=str(out / "ckpt" / "step=1.ckpt") if phase == "resumed" else None)
    buffers = {{p: list(b) for p, b in m.buffers.items()}}
    result = {{"record": m.record, "buffers": buffers}}
    (out / f"{{phase}}_rank{{trainer.global_rank}}.json").write_text(json.dumps(result))


run("straight")
run("resumed")  # the same two processes, a fresh model and trainer
"""


def test_ddp_gathers_rewards_for_advantages_and_resumes_exactly(tmp_path):
    """2 CPU processes (gloo): each process's advantages are its slice of those a single process
    computes on the concatenated batch, step after step; a run resumed from a checkpoint continues
    with the same advantages (every process's buffers are saved)."""
    script = tmp_path / "ddp_ddpo.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {(ph, r): json.loads((tmp_path / f"{ph}_rank{r}.json").read_text())
            for ph in ("straight", "resumed") for r in (0, 1)}
    ranks = [runs["straight", r]["record"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    buffers = defaultdict(lambda: deque(maxlen=16))
    for s0, s1 in zip(*ranks):
        assert s0["rewards"] != s1["rewards"], "ranks draw different noise"
        prompts, rewards = s0["prompts"] + s1["prompts"], np.array(s0["rewards"] + s1["rewards"])
        expected = np.clip(normalize_per_prompt(prompts, rewards, buffers, min_count=4), -5, 5)
        assert np.allclose(s0["adv"] + s1["adv"], expected, atol=1e-5), (s0, s1)
    assert runs["straight", 0]["buffers"] == runs["straight", 1]["buffers"] == {p: list(b) for p, b in buffers.items()}

    for ph in ("straight", "resumed"):  # gradients all-reduced once per minibatch still keep the ranks equal
        summary = json.loads((tmp_path / ph / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["ranks_in_sync"], summary["param_checksums"]

    ck = torch.load(tmp_path / "ckpt" / "step=1.ckpt", map_location="cpu", weights_only=False)
    assert len(ck["ddpo_buffers_per_rank"]) == 2
    for r in (0, 1):
        resumed = runs["resumed", r]["record"]
        assert [s["step"] for s in resumed] == [1, 2]
        assert resumed == ranks[r][1:], "the resumed run sees the same samples and advantages"
        assert runs["resumed", r]["buffers"] == runs["straight", r]["buffers"]


def test_ddpo_speed_benchmark_writes_its_table(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ddpo_speed

    threads = torch.get_num_threads()
    try:
        page = ddpo_speed.main(["--tiny", "--threads", "1", "--folder", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = page.read_text()
    assert page == tmp_path / "ddpo_speed_tiny.md"
    assert "| DDPO (this commit), gradient_checkpointing on |" in text and "ratio (CPU)" in text
    assert "**commit**" in text and "**machine**" in text
    row = next(line for line in text.splitlines() if line.startswith("| DDPO (this commit)"))
    assert float(row.split("|")[4]) > 0  # a ratio to the plain sampling pass
