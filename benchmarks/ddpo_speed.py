"""DDPO's cost per sample (sampling + PPO training) as a ratio to a plain no-grad sampling pass of the
same generator, measured in the same run so the ratio does not depend on the machine.

The settings of the review's comparison with TRL 0.23.1's DDPOTrainer: a random Stable Diffusion
layout (3.9 M-parameter UNet with blocks (64, 128), a 2-level VAE, a 2-layer CLIP text encoder),
32 px, DDIM T=20 with eta=1, CFG 5, LoRA rank 4 on the attention projections, JPEG compressibility
as the black-box reward, 2 torch threads. DDPO: 2 prompts x 4 samples per
sampled batch, 2 minibatches (one optimiser step each), every timestep trained.

Each timed DDPO batch (Lightning's training batch: sampling, reward, PPO updates; held-out evaluation
off; one warm-up batch first) is paired with a plain pass over as many samples run just before it
(encode the prompts, T guided denoiser calls without grad, VAE decode), so load from other jobs hits
both sides of each ratio alike. Variants: DDPO at this checkout and, with ``--before REF``, DDPO's
file at a git commit (or a path) run against today's generator; each with the generator's
``gradient_checkpointing`` on (StableDiffusionGenerator's default) and/or off (``--checkpointing``).

Usage: python benchmarks/ddpo_speed.py [--reps 3] [--batches 3] [--threads 2] [--before edb71c5]
       [--checkpointing on off] [--tiny]
Writes benchmarks/results/ddpo_speed.md (``--tiny``: ddpo_speed_tiny.md, a seconds-long run for the test).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["one red circle", "two blue squares", "three green triangles", "one yellow square",
           "two white circles", "three red squares"]


def components(tiny: bool, seed: int = 0) -> dict:
    """Random SD-layout components: UNet (64, 128) = 3.9 M parameters (``tiny``: (8, 16))."""
    import torch
    from diffusers import AutoencoderKL

    from domains.images.tiny import build_tokenizer, tiny_scheduler, tiny_text_encoder, tiny_unet

    torch.manual_seed(seed)
    tok = build_tokenizer()
    unet = tiny_unet(16, in_channels=4, channels=(8, 16) if tiny else (64, 128))
    vae_ch = (8, 8) if tiny else (32, 64)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_ch,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    return {"unet": unet, "text_encoder": tiny_text_encoder(len(tok)), "tokenizer": tok,
            "scheduler": tiny_scheduler(), "vae": vae}


def make_generator(args, checkpointing: bool = False):
    import copy

    from domains.images.stable_diffusion import StableDiffusionGenerator

    comps = copy.deepcopy(args.components)  # every variant starts from the same weights
    return StableDiffusionGenerator.from_components(
        **comps, height=32, width=32, sampler="ddim", num_steps=args.steps, guidance_scale=5.0, eta=1.0,
        gradient_checkpointing=checkpointing, lora_rank=4)


def load_ddpo(ref: str | None):
    """DDPO from this checkout (ref None), a file path, or ``rewardopt/methods/ddpo.py`` at a commit."""
    if ref is None:
        from rewardopt.methods.ddpo import DDPO

        return DDPO
    path = Path(ref)
    if not path.is_file():
        src = subprocess.run(["git", "show", f"{ref}:rewardopt/methods/ddpo.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "ddpo_before.py"
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"ddpo_before_{abs(hash(ref))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DDPO


def clocks() -> tuple[float, float]:
    """(wall, CPU time of this process): CPU time is robust to other jobs sharing the cores."""
    return time.perf_counter(), time.process_time()


def elapsed(t0: tuple[float, float]) -> tuple[float, float]:
    return tuple(b - a for a, b in zip(t0, clocks()))


def plain_pass(g, prompts: list[str], seed: int) -> None:
    """What a user's sampling costs: encode the prompts, T guided denoiser calls without grad, decode."""
    import torch

    with torch.no_grad():
        cond = g.encode_condition(prompts)
        g.decode(g.sample(cond, generator=torch.Generator().manual_seed(seed), grad_last_k=0))


def time_ddpo(args, cls, seed: int, checkpointing: bool) -> list[tuple[float, float]]:
    """Per timed batch: DDPO's (wall, CPU) seconds per sample (sampling, reward, PPO updates) divided
    by those of a plain pass over as many samples run just before it — interleaved pairs, so that
    load from other jobs hits both sides of each ratio alike."""
    import lightning as L

    from domains.images.rewards import JpegCompressibilityReward
    from rewardopt.data import PromptDataModule

    n = args.prompts * args.samples_per_prompt
    plain_g = make_generator(args)

    class PairTimer(L.Callback):
        def __init__(self):
            self.pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            t0 = clocks()
            plain_pass(plain_g, [p for p in batch for _ in range(args.samples_per_prompt)], 1000 * seed + batch_idx)
            self.plain = elapsed(t0)
            self.t0 = clocks()

        def on_train_batch_end(self, *a):
            self.pairs.append((self.plain, elapsed(self.t0)))

    out = tempfile.mkdtemp()
    m = cls(make_generator(args, checkpointing), JpegCompressibilityReward(max_workers=2),
            samples_per_prompt=args.samples_per_prompt, num_minibatches=2, clip_range=1e-4, min_count=8, lr=3e-4,
            seed=seed, output_dir=out)
    m.evaluate = lambda loader=None: 0.0  # held-out evaluation is not part of the per-sample cost
    timer = PairTimer()
    data = PromptDataModule(PROMPTS, PROMPTS[:1], batch_size=args.prompts, val_batch_size=1, val_repeats=1,
                            epoch_size=64, seed=seed)
    trainer = L.Trainer(max_steps=2 * (args.batches + 1), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer], default_root_dir=out)
    trainer.fit(m, datamodule=data)
    # the first pair is a warm-up; per pair: (plain wall, plain CPU, DDPO wall, DDPO CPU) per sample
    return [(p[0] / n, p[1] / n, d[0] / n, d[1] / n) for p, d in timer.pairs[1:]]


def results_table(rows: dict[str, list[tuple[float, float, float, float]]]) -> str:
    """Markdown: per variant, median s/sample of DDPO and of the plain passes interleaved with it, and
    the median (min..max) over timed batches of their ratio, by wall clock and by this process's CPU time."""
    med = statistics.median
    lines = ["| variant | DDPO s/sample (wall) | plain s/sample (wall) | ratio (wall) | min..max | ratio (CPU) |",
             "|---|---|---|---|---|---|"]
    for name, pairs in rows.items():
        wall = [d / p for p, _, d, _ in pairs]
        cpu = [d / p for _, p, _, d in pairs]
        lines.append(f"| {name} | {med(q[2] for q in pairs):.4f} | {med(q[0] for q in pairs):.4f} | {med(wall):.2f} | "
                     f"{min(wall):.2f}..{max(wall):.2f} | {med(cpu):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    import torch
    from results_md import write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=3, help="timed DDPO batches per repetition (after a warm-up)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per sampled batch")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on"],
                    help="the generator's gradient_checkpointing (StableDiffusionGenerator's default: on)")
    ap.add_argument("--before", default=None, help="a git commit (or a file) whose ddpo.py to time as well")
    ap.add_argument("--note", default="", help="a paragraph added to the result page (e.g. an outside comparison)")
    ap.add_argument("--tiny", action="store_true", help="seconds-long run on a smaller UNet (for tests)")
    ap.add_argument("--name", default=None, help="result page name (default ddpo_speed; --tiny: ddpo_speed_tiny)")
    ap.add_argument("--folder", default=None, help="where the result page goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.batches, args.reps, args.samples_per_prompt = 3, 1, 1, 2
    torch.set_num_threads(args.threads)
    args.components = components(args.tiny)
    variants = {"DDPO (this commit)": load_ddpo(None)}
    if args.before:
        variants[f"DDPO at {args.before}"] = load_ddpo(args.before)
    rows: dict[str, list] = {}
    for rep in range(args.reps):
        for (name, cls), ckpt in itertools.product(variants.items(), args.checkpointing):
            name = f"{name}, gradient_checkpointing {ckpt}"
            pairs = time_ddpo(args, cls, rep, ckpt == "on")
            rows.setdefault(name, []).extend(pairs)
            print(f"rep {rep}: {name}: " + ", ".join(f"{d / p:.2f}x" for p, _, d, _ in pairs), flush=True)
    table = results_table(rows)
    print(table)
    n_unet = sum(p.numel() for p in args.components["unet"].parameters()) / 1e6
    notes = (f"UNet {n_unet:.2f} M parameters, 32 px, DDIM T={args.steps} eta=1, CFG 5, LoRA r4, "
             f"{args.prompts} prompts x {args.samples_per_prompt} samples per batch, 2 minibatches, "
             f"{args.batches} timed batches per repetition (after a warm-up), {args.reps} repetitions; each ratio is "
             "one DDPO batch over the plain pass run just before it. On cores shared with other jobs read the CPU "
             "ratio (this process's CPU time), which their load barely moves.")
    if args.note:
        notes += "\n\n" + args.note
    name = args.name or ("ddpo_speed_tiny" if args.tiny else "ddpo_speed")
    return write_result(name, [table], seeds=list(range(args.reps)), title="DDPO speed per sample", notes=notes,
                        folder=Path(args.folder) if args.folder else None)


if __name__ == "__main__":
    main()
