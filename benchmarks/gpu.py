"""What only a GPU can show: time and peak memory of one fine-tuning step at Stable Diffusion 1.5 size.

The pipeline is SD 1.5's architecture built offline from its published configs with random weights
(UNet2DConditionModel 320/640/1280/1280 with cross-attention 768, AutoencoderKL 128/256/512/512,
a 12-layer 768-wide CLIP text encoder over 77 tokens; the DDIM schedule of SD 1.5), at 512 px,
CFG 7.5, LoRA rank 4 on the UNet's attention projections, gradient checkpointing on, bf16-mixed.
Random weights cost exactly what trained ones cost, so speed and memory are those of the real model.

Methods (each one optimiser step per batch, the method's own ``training_step`` under a Lightning
``Trainer`` — the code users run — with evaluation switched off):

* DRaFT-1 (k=1), DRaFT-LV (k=1, n=2), DRaFT with K=T (full backprop, checkpointed),
* AlignProp (truncation drawn once per rollout, gaussian 42±5 of 50, scaled to T),
* DDPO (eta=1; one sample per prompt and one minibatch, so a batch of b is b trajectories).

Each is reported at batch 1/2/4 as the median step time over ``--repeats`` steps after one warm-up
step, divided by a plain no-grad sampling pass (the same generator, batch and T: sample + decode) timed
in the same run, so the ratio does not depend on the machine's speed; and the peak
``torch.cuda.max_memory_allocated`` during the step (absolute, and over the plain pass's peak).

``--tiny`` runs the same code on a tiny model on CPU in seconds (the test of this script).

Usage:
    python benchmarks/gpu.py                       # on a CUDA machine: SD-1.5 size, T=50
    python benchmarks/gpu.py --steps 20 --batches 1 2
    python benchmarks/gpu.py --tiny                # CPU smoke mode (writes to runs/, not results/)
This script is plain Python over torch/diffusers/transformers/peft/lightning: no LightningCLI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS = ["DRaFT-1", "DRaFT-LV", "DRaFT K=T", "AlignProp", "DDPO"]

# SD 1.5's published component configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/,
# scheduler/ config.json), written out so that nothing is downloaded.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, act_fn="silu", scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=16)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)

PROMPTS = ["two red circles", "one blue square", "three green triangles", "one white circle"]


def build_generator(tiny: bool, steps: int, eta: float, seed: int = 0):
    """The SD-1.5-architecture (or tiny) generator, random weights, LoRA r4, checkpointing on."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from domains.images.stable_diffusion import StableDiffusionGenerator
    from domains.images.tiny import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    tok.model_max_length = 77  # SD pads every prompt to CLIP's 77 positions
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        **(TINY_TEXT if tiny else SD15_TEXT)))
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    size = 16 if tiny else 512
    return StableDiffusionGenerator.from_components(
        unet, text, tok, DDIMScheduler(**SD15_SCHEDULER), vae=vae, height=size, width=size, num_steps=steps,
        guidance_scale=7.5, eta=eta, gradient_checkpointing=True, lora_rank=4)


def build_method(name: str, gen):
    """The method under a subclass that skips held-out evaluation and the run summary (timing only)."""
    from domains.images.rewards import ColourReward
    from rewardopt.methods.alignprop import AlignProp
    from rewardopt.methods.ddpo import DDPO
    from rewardopt.methods.draft import DRaFT

    reward = ColourReward("blue")  # differentiable and size-agnostic; its cost is negligible at 512 px
    cls, kw = {
        "DRaFT-1": (DRaFT, dict(k=1)),
        "DRaFT-LV": (DRaFT, dict(k=1, lv_samples=2)),
        "DRaFT K=T": (DRaFT, dict(k=None)),
        "AlignProp": (AlignProp, dict(truncation="gaussian")),
        "DDPO": (DDPO, dict(samples_per_prompt=1, num_minibatches=1, min_count=1)),
    }[name]
    timed = type(f"Timed{cls.__name__}", (cls,), {"on_train_end": lambda self: None})
    m = timed(gen, reward, **kw)
    m.reward_before = float("nan")  # skips the held-out evaluation in on_train_start
    return m


def step_timer():
    """A Lightning callback recording the wall time and peak CUDA memory of each training batch."""
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peaks: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.peaks.append(torch.cuda.max_memory_allocated())
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def time_plain(gen, batch: int, repeats: int, precision: str) -> tuple[float, int | None]:
    """Median time (s) and peak memory (bytes) of a no-grad sampling pass + decode at ``batch``."""
    import torch

    device = next(gen.denoiser.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    times, peak = [], None
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            cond = gen.encode_condition([PROMPTS[j % len(PROMPTS)] for j in range(batch)])
            gen.decode(gen.sample(cond, generator=torch.Generator().manual_seed(r), grad_last_k=0))
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak or 0, torch.cuda.max_memory_allocated())
        if r > 0:  # the first pass is a warm-up (kernel selection, allocator)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def run_method(name: str, batch: int, args) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    gen = build_generator(args.tiny, args.steps, eta=1.0 if name == "DDPO" else 0.0)
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    if accel == "gpu":
        gen.to("cuda")
    plain_s, plain_peak = time_plain(gen, batch, args.repeats, args.precision)
    model = build_method(name, gen)
    n_steps = 1 + args.repeats
    prompts = [PROMPTS[j % len(PROMPTS)] for j in range(batch * n_steps)]
    timer = step_timer()
    trainer = L.Trainer(accelerator=accel, devices=1, precision=args.precision, max_steps=n_steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(model, train_dataloaders=DataLoader(prompts, batch_size=batch, collate_fn=list))
    if len(timer.times) != n_steps:
        raise RuntimeError(f"{name}: expected {n_steps} timed training batches, saw {len(timer.times)}")
    step_s = statistics.median(timer.times[1:])  # the first step is a warm-up
    peak = max(timer.peaks[1:]) if timer.peaks else None
    out = {"method": name, "batch": batch, "step_s": step_s, "plain_s": plain_s, "ratio": step_s / plain_s,
           "peak_gib": peak / 2**30 if peak else None, "plain_peak_gib": plain_peak / 2**30 if plain_peak else None}
    del trainer, model, gen
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = ["| method | batch | step (s) | plain sampling pass (s) | step / plain | peak memory (GiB) | "
             "peak / plain pass peak |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r["peak_gib"] / r["plain_peak_gib"] if r["peak_gib"] and r["plain_peak_gib"] else None
        lines.append(f"| {r['method']} | {r['batch']} | {r['step_s']:.3f} | {r['plain_s']:.3f} | {r['ratio']:.2f} | "
                     f"{fmt(r['peak_gib'], '.2f')} | {fmt(rel, '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU (smoke test; writes under runs/)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps T (default 50; --tiny: 4)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 2 4 (--tiny: 1 2)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on CUDA, else 32-true)")
    ap.add_argument("--out", type=Path, default=None, help="folder of the result page")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 50)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 2, 4])
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py measures SD-1.5 size on a CUDA device; none is visible. "
                         "Use --tiny for the CPU smoke mode.")
    rows = []
    for name in args.methods:
        for b in args.batches:
            rows.append(run_method(name, b, args))
            r = rows[-1]
            print(f"  {name:10s} batch {b}: step {r['step_s']:.3f}s = {r['ratio']:.2f}x plain pass"
                  + (f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] else ""), file=sys.stderr, flush=True)
    md = table(rows)
    print(md)
    from results_md import write_result

    scale = "tiny (CPU smoke mode)" if args.tiny else "SD-1.5 architecture, random weights, 512 px"
    notes = (f"{scale}; T={args.steps} DDIM steps, CFG 7.5, LoRA r4, gradient checkpointing, precision "
             f"{args.precision}; median of {args.repeats} steps after a warm-up step. `step / plain` divides one "
             "optimiser step by a no-grad sampling pass (sample + decode) of the same batch in the same run.")
    folder = args.out or (ROOT / "runs" if args.tiny else None)
    write_result("gpu_tiny" if args.tiny else "gpu", [md], seeds=[0], title="Fine-tuning step time and memory "
                 "on a GPU", notes=notes, folder=folder)
    if folder is not None:
        (Path(folder) / ("gpu_tiny.json" if args.tiny else "gpu.json")).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
