"""DiffRO on the tiny codec LM: evaluation CER and attribute accuracy from decoded audio, against
the REINFORCE baseline with the same reward at equal steps.

Runs (each from the shipped pretrained LM, per seed):
* pretrained;
* DiffRO-ASR (Token2Text reward, β=0.1) and REINFORCE-ASR (same reward and β, 2 samples per text),
  ``--steps`` optimiser steps of ``--batch`` sequences each;
* DiffRO-MTR (pitch head + 0.5·Token2Text), training prompts asking for a random pitch level.
  Pitch is the attribute the pretrained LM follows worst (gender it follows almost always).

Evaluation on ``--n`` held-out texts prompted with their own attributes, under two samplers:
``T=1`` (temperature 1, the full distribution: what this page reported before) and ``paper``,
the sampler of the system DiffRO fine-tunes (CosyVoice2): temperature 1 with nucleus top-p 0.8 and
top-k 25. That setting is *our reading*: the DiffRO paper (arXiv 2507.05911) does not state its
sampler and ../shared/METHODS.md says nothing of it; it is CosyVoice2's public config
(examples/libritts/cosyvoice2/conf/cosyvoice2.yaml, ``ras_sampling``). Its repetition-aware fallback
(a full-distribution redraw when the token repeats within 10) is not implemented here.
Free-running samples -> codes -> audio (codec + Griffin-Lim) -> the separately trained recogniser:
CER (torchaudio edit distance) and pitch accuracy from audio. Next to them, the reward models' view:
the median Token2Text reward and the pitch head's accuracy on the tokens (a gap between the two
views is reward hacking), and the KL to the pretrained LM (Monte Carlo: mean log π_θ(y) − log
π_ref(y) over the samples, under the unfiltered policy).

``--before-rev REV`` also evaluates the pretrained LM shipped at git revision REV (e.g. the 2-layer
default before issue 14), and ``--before-runs`` which fine-tuning runs to repeat on it.
Each (model, run, seed) result is cached in ``--out``/cache (``--reuse`` reads it back), and the page
is rewritten after every seed, so an interrupted run leaves the seeds it finished.

Usage: python benchmarks/tts.py [--steps 200] [--lr 3e-4] [--seeds 0 1 2] [--n 48] [--before-rev REV]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import time
from pathlib import Path

from results_md import write_result

RUNS = ["DiffRO-ASR", "REINFORCE-ASR", "DiffRO-MTR"]
SAMPLERS = {"T=1": {"top_k": 0, "top_p": 1.0}, "paper": {"top_k": 25, "top_p": 0.8}}

# The page before issue 14 item 4 (measured 2026-11-28 at commit 593824d, `python benchmarks/tts.py`,
# 2 CPU cores, seeds 0 1): the 2-layer LM, 200 steps of 16 sequences, lr 3e-4, beta 0.1, 48 texts, T=1.
BEFORE_PAGE = """\
| method | CER (audio) | pitch acc (audio) | pitch acc (head) | Token2Text (median) | KL | tokens |
|---|---|---|---|---|---|---|
| pretrained | 0.545 ± 0.005 | 0.698 ± 0.031 | 0.708 | -2.303 | 0.00 | 51.4 |
| DiffRO-ASR | 0.531 ± 0.004 | 0.646 ± 0.042 | 0.708 | -2.230 | 2.43 | 51.4 |
| REINFORCE-ASR | 0.554 ± 0.005 | 0.583 ± 0.062 | 0.708 | -2.324 | 10.76 | 52.0 |
| DiffRO-MTR | 0.568 ± 0.001 | 0.667 ± 0.021 | 0.865 | -2.392 | 4.83 | 50.2 |"""


def evaluate(g, conds, recogniser, codec, t2t, head, seed: int, sampler: dict, attribute: str = "pitch") -> dict:
    import torch

    from domains.tts.corpus import ATTRIBUTES
    from domains.tts.rewards import cer

    saved = (g.top_k, g.top_p)
    g.top_k, g.top_p = sampler["top_k"], sampler["top_p"]
    try:
        with torch.no_grad():
            cond = g.encode_condition(conds)
            x = g.sample(cond, generator=torch.Generator().manual_seed(10_000 + seed))
            ids, mask = g.sampled_targets(x)
            logp = -g.teacher_forced_nll(cond, ids, mask)
            with g.base_model():
                logp_ref = -g.teacher_forced_nll(cond, ids, mask)
            reward = t2t(x, conds).total.median().item()
            _, _, logits = head.model(x[..., g.vocab.codec_offset:g.vocab.codec_offset + g.vocab.codebook_size])
    finally:
        g.top_k, g.top_p = saved
    wavs = [codec.to_audio(torch.tensor(c)) if c else torch.zeros(0) for c in g.codes(x)]
    hyp, attrs = recogniser.transcribe(wavs)
    wanted = [c[attribute] for c in conds]
    values = ATTRIBUTES[attribute]
    return {"cer": cer(hyp, [c["text"] for c in conds]),
            "attr_acc_audio": sum(a == w for a, w in zip(attrs[attribute], wanted)) / len(conds),
            "attr_acc_tokens": sum(values[i] == w for i, w in zip(logits[attribute].argmax(-1).tolist(), wanted))
            / len(conds),
            "token2text": reward, "kl": float((logp - logp_ref).mean()), "tokens": float(mask.sum(1).mean())}


def train(pretrained: str, method: str, reward, steps: int, batch: int, seed: int, lr: float, kl: float,
          random_pitch: bool, out: str):
    import lightning as L

    from domains.tts.data import TTSDataModule
    from domains.tts.generator import CodecLMGenerator
    from rewardopt.methods.diffro import DiffRO
    from rewardopt.methods.reinforce import Reinforce

    L.seed_everything(seed, verbose=False)
    g = CodecLMGenerator(pretrained, full_finetune=True)
    rand = ["pitch"] if random_pitch else None  # MTR: training prompts ask for a random pitch level
    if method == "DiffRO":
        m = DiffRO(g, reward, kl_weight=kl, lr=lr, seed=seed, output_dir=out)
        dm = TTSDataModule(batch_size=batch, max_val=8, random_attributes=rand)
    else:
        m = Reinforce(g, reward, samples_per_prompt=2, kl_weight=kl, lr=lr, seed=seed, output_dir=out)
        dm = TTSDataModule(batch_size=batch // 2, max_val=8, random_attributes=rand)
    t0 = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0).fit(m, datamodule=dm)
    return g, {"train_s": time.perf_counter() - t0, "train_nfe": g.counter.nfe}


def model_from_rev(rev: str, out: Path) -> str:
    """The shipped tiny codec LM at git revision ``rev``, written to ``out`` (a folder to load)."""
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "domains/tts/assets/tiny_tts/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        dest = out / Path(f).relative_to("domains/tts/assets/tiny_tts")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, check=True).stdout)
    return str(out)


def describe(path: str) -> tuple[str, str]:
    """(a short description of the LM's shape, a fingerprint of its weights)."""
    from domains.tts.generator import EMBEDDED

    folder = Path(EMBEDDED.get(path, path))
    cfg = json.loads((folder / "lm" / "config.json").read_text())
    digest = hashlib.sha256((folder / "lm" / "model.safetensors").read_bytes()).hexdigest()[:12]
    return f"GPT-2, {cfg['n_layer']} layers, hidden {cfg['n_embd']}", digest


def table(rows: list[dict], sampler: str) -> str:
    lines = ["| model | method | seeds | CER (audio, recogniser) | pitch acc (audio) | pitch acc (reward head) "
             "| Token2Text reward (median) | KL to pretrained | tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["sampler"] != sampler:
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['n_seeds']} | {r['cer']:.3f} ± {r['cer_sd']:.3f} "
                     f"| {r['attr_acc_audio']:.3f} ± {r['attr_acc_audio_sd']:.3f} | {r['attr_acc_tokens']:.3f} "
                     f"| {r['token2text']:.3f} | {r['kl']:.2f} | {r['tokens']:.1f} |")
    return "\n".join(lines)


def relative(rows: list[dict]) -> str:
    """CER change of each fine-tuning run against its own model's pretrained row, per sampler."""
    base = {(r["model"], r["sampler"]): r["cer"] for r in rows if r["method"] == "pretrained"}
    lines = ["| model | sampler | method | CER pretrained -> fine-tuned | change |", "|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["model"], r["sampler"]))
        if r["method"] != "pretrained" and b:
            lines.append(f"| {r['model']} | {r['sampler']} | {r['method']} | {b:.3f} -> {r['cer']:.3f} "
                         f"| {100 * (r['cer'] - b) / b:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    import torch

    from domains.tts.codec import MelCodec
    from domains.tts.data import CODEC, CORPUS, condition_of, load_corpus, split
    from domains.tts.generator import CodecLMGenerator
    from domains.tts.rewards import AttributeReward, AudioRecogniser, Token2TextReward
    from rewardopt.rewards.base import WeightedSum

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/tts_bench")
    p.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    p.add_argument("--before-rev", default=None, help="also evaluate the tiny LM shipped at this git revision")
    p.add_argument("--before-runs", nargs="*", default=[], choices=RUNS, help="fine-tuning runs on that LM too")
    p.add_argument("--reuse", action="store_true", help="read back cached (model, run, seed) results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    _, val = split(load_corpus(CORPUS)["items"])
    conds = [condition_of(i) for i in val[: args.n]]
    codec, recogniser = MelCodec.load(CODEC), AudioRecogniser.load()
    t2t, pitch = Token2TextReward(), AttributeReward("pitch")
    mtr = WeightedSum({"pitch": pitch, "token2text": t2t}, {"pitch": 1.0, "token2text": 0.5})
    specs = {"DiffRO-ASR": ("DiffRO", t2t, False), "REINFORCE-ASR": ("Reinforce", t2t, False),
             "DiffRO-MTR": ("DiffRO", mtr, True)}
    models = [("embedded:tiny-tts", "now", args.runs)]
    if args.before_rev:
        models.append((model_from_rev(args.before_rev, out / "before_model"), f"before ({args.before_rev})",
                       args.before_runs))
    shapes = {label: describe(path) for path, label, _ in models}
    results: dict[tuple, list[dict]] = {}

    def run_one(path: str, label: str, run: str, seed: int) -> dict:
        key = dict(model=shapes[label][1], run=run, seed=seed, steps=args.steps, batch=args.batch, lr=args.lr,
                   kl=args.kl, n=args.n, samplers=SAMPLERS)
        f = out / "cache" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
        if args.reuse and f.is_file():
            return json.loads(f.read_text())["result"]
        if run == "pretrained":
            g, info = CodecLMGenerator(path, full_finetune=True), {}
            g.setup_trainable()
        else:
            method, reward, flip = specs[run]
            g, info = train(path, method, reward, args.steps, args.batch, seed, args.lr, args.kl, flip,
                            str(out / f"{run}_{seed}"))
        res = {s: {**evaluate(g, conds, recogniser, codec, t2t, pitch, seed, cfg), **info}
               for s, cfg in SAMPLERS.items()}
        f.write_text(json.dumps({"key": key, "result": res}, indent=1))
        print(f"  {label:14s} {run:14s} seed {seed}: " + "; ".join(
            f"{s} CER {r['cer']:.3f} pitch {r['attr_acc_audio']:.3f} t2t {r['token2text']:.3f} kl {r['kl']:.2f}"
            for s, r in res.items()) + (f"; {info['train_s']:.0f} s training" if info else ""), flush=True)
        return res

    def rows() -> list[dict]:
        out_rows = []
        for (label, run), per in results.items():
            for s in SAMPLERS:
                vals = [r[s] for r in per]
                agg = {k: statistics.mean(v[k] for v in vals) for k in vals[0]}
                agg.update({f"{k}_sd": statistics.pstdev([v[k] for v in vals]) for k in ("cer", "attr_acc_audio")})
                out_rows.append({"model": label, "method": run, "sampler": s, "n_seeds": len(vals), **agg})
        return out_rows

    def write_page(done: list[int]) -> None:
        rs = rows()
        (out / "tts.json").write_text(json.dumps({"args": vars(args), "seeds_done": done, "rows": rs}, indent=2))
        shape_txt = "; ".join(f"{label}: {s} (weights {h})" for label, (s, h) in shapes.items())
        head = (f"{args.n} held-out texts; seeds finished: {', '.join(map(str, done))} (asked: "
                f"{', '.join(map(str, args.seeds))}); {args.steps} steps of {args.batch} sequences, lr {args.lr}, "
                f"beta {args.kl}; mean over seeds (± sd), {args.threads} torch thread(s). Models: {shape_txt}.")
        timing = [f"{r['model']} {r['method']}: {r['train_s']:.0f} s training per seed, {r['train_nfe']:.0f} LM passes"
                  for r in rs if "train_s" in r and r["sampler"] == "T=1"]
        tables = [head,
                  "## Sampler `paper`: temperature 1, top-p 0.8, top-k 25 (CosyVoice2's config; our reading)",
                  table(rs, "paper"),
                  "## Sampler `T=1`: temperature 1, full distribution (the setting of the page before)",
                  table(rs, "T=1"),
                  "## CER change against each model's own pretrained row", relative(rs),
                  "\n".join(f"- {t}" for t in timing),
                  "## Before: the page as it was (2-layer LM, T=1, seeds 0 1, measured 2026-11-28 at 593824d)",
                  BEFORE_PAGE]
        write_result("tts", tables=tables, seeds=done, title="TTS codec LM: DiffRO vs REINFORCE")

    done = []
    for seed in args.seeds:
        for path, label, runs in models:
            for run in ["pretrained", *[r for r in RUNS if r in runs]]:
                results.setdefault((label, run), []).append(run_one(path, label, run, seed))
        done.append(seed)
        write_page(done)
    print(f"wrote {out}/tts.json")


if __name__ == "__main__":
    main()
