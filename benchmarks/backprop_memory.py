"""Peak memory and time of one DRaFT-K step vs T, K and gradient checkpointing.

Model: a small latent-space Stable-Diffusion-architecture pipeline built from configs (SD's
4-level UNet layout with cross-attention at 3 levels, narrow channels; a tiny VAE; a CLIP text
encoder), CFG on, DDIM. Reward: a differentiable function of the decoded image.

Each configuration runs in a fresh subprocess. Memory: peak resident set size during the step
(sampled every 0.5 ms, with glibc told to return freed memory at once) minus the resident size
just before it (the idle process, after a warm-up pass). Time: one DRaFT-K
step (forward, reward, backward) divided by a plain no-grad sampling pass timed in the same process,
then compared with the ideal cost counted in denoiser forwards:

    ideal = (T - K) no-grad forwards + K forwards with grad + K recomputations (if checkpointing)
            + 2 forwards per backward (K backwards)
    ratio = (t_step / (t_plain / T)) / ideal          target <= 1.15

Usage: python benchmarks/backprop_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_md import record_stdout

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def poll_peak_rss(fn) -> float:
    """Run fn while a thread samples the resident set size every 0.5 ms; return the peak (MB).
    The parent sets glibc's malloc to return freed memory at once, so RSS follows live memory."""
    import threading

    peak, done = [rss_mb()], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0005)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0]


def build(T: int, ckpt: bool):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from domains.images.stable_diffusion import StableDiffusionGenerator
    from domains.images.tiny import build_tokenizer, tiny_scheduler, tiny_text_encoder

    torch.manual_seed(0)
    tok = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=32)
    return StableDiffusionGenerator.from_components(
        unet, tiny_text_encoder(len(tok)), tok, tiny_scheduler(), vae=vae, height=32, width=32, num_steps=T,
        guidance_scale=7.5, gradient_checkpointing=ckpt, lora_rank=4)


def worker(T: int, K: int, ckpt: bool, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    g = build(T, ckpt)
    prompts = ["two red circles", "one blue square", "three green triangles", "one white circle"][:batch]
    cond = g.encode_condition(prompts)
    params = g.trainable_parameters()

    def plain():
        with torch.no_grad():
            return g.decode(g.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=0))

    def draft_step():
        x0 = g.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=K)
        loss = -g.decode(x0).mean()
        loss.backward()
        for p in params:
            p.grad = None

    plain()  # warm-up: kernels
    draft_step()
    idle = rss_mb()
    peak = poll_peak_rss(draft_step)
    t_plain, t_step = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        draft_step()
        t_step.append(time.perf_counter() - t0)
    t_plain_m, t_step_m = sorted(t_plain)[len(t_plain) // 2], sorted(t_step)[len(t_step) // 2]
    ideal = (T - K) + K + (K if ckpt else 0) + 2 * K
    measured = t_step_m / (t_plain_m / T)
    return {"T": T, "K": K, "ckpt": ckpt, "peak_above_idle_mb": peak - idle,
            "step_s": t_step_m, "plain_s": t_plain_m, "ideal_forwards": ideal,
            "measured_forwards": measured, "ratio_to_ideal": measured / ideal}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=str, default=None)
    ap.add_argument("--quick", action="store_true", help="T in {10, 20} only")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.worker:
        T, K, ckpt = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(T, K, ckpt, args.batch, args.repeats)))
        return
    rows = []
    for T in ([10, 20] if args.quick else [10, 20, 50]):
        for K in sorted({1, 5, T}):
            for ckpt in (True, False):
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps([T, K, ckpt]), "--batch",
                                      str(args.batch), "--repeats", str(args.repeats)],
                                     cwd=ROOT, capture_output=True, text=True,
                                     env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
                                          "MALLOC_TRIM_THRESHOLD_": "0"})
                line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
                if not line:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"worker T={T} K={K} ckpt={ckpt} failed")
                rows.append(json.loads(line[0][7:]))
                r = rows[-1]
                print(f"  T={T:>2} K={K:>2} ckpt={'on ' if ckpt else 'off'} peak+{r['peak_above_idle_mb']:.0f} MB "
                      f"step {r['step_s']:.2f}s ratio {r['ratio_to_ideal']:.2f}", file=sys.stderr, flush=True)
    with record_stdout("backprop_memory", title="DRaFT-K memory and time vs T, K, checkpointing"):
        print("\n| T | K | checkpointing | peak above idle (MB) | step (s) | plain pass (s) | step / ideal |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['T']} | {r['K']} | {'on' if r['ckpt'] else 'off'} | {r['peak_above_idle_mb']:.1f} | "
                  f"{r['step_s']:.3f} | {r['plain_s']:.3f} | {r['ratio_to_ideal']:.2f} |")
        by = {(r["T"], r["K"], r["ckpt"]): r for r in rows}
        Tmax = max(r["T"] for r in rows)
        full, one = by[(Tmax, Tmax, True)], by[(Tmax, 1, True)]
        ratio = full["peak_above_idle_mb"] / max(one["peak_above_idle_mb"], 1e-9)
        print(f"\nCheckpointing on: peak memory at K=T={Tmax} is {ratio:.2f}x that at K=1 (target <= 1.5).")
        worst = max((r for r in rows if r["ckpt"]), key=lambda r: r["ratio_to_ideal"])
        print(f"Worst DRaFT-K step / ideal with checkpointing: {worst['ratio_to_ideal']:.2f} "
              f"at T={worst['T']} K={worst['K']} (target <= 1.15).")
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "backprop_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
