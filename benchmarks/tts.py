"""DiffRO on the tiny codec LM: evaluation CER and attribute accuracy from decoded audio, against
the REINFORCE baseline with the same reward at equal steps.

Runs (each from the shipped pretrained LM, per seed):
* pretrained;
* DiffRO-ASR (Token2Text reward, β=0.1) and REINFORCE-ASR (same reward and β, 2 samples per text),
  ``--steps`` optimiser steps of ``--batch`` sequences each;
* DiffRO-MTR (pitch head + 0.5·Token2Text), training prompts asking for a random pitch level.
  Pitch is the attribute the pretrained LM follows worst (gender it follows almost always).

Evaluation on ``--n`` held-out texts prompted with their own attributes: free-running samples
(temperature 1) -> codes -> audio (codec + Griffin-Lim) -> the separately trained recogniser: CER
(torchaudio edit distance) and pitch accuracy from audio. Next to them, the reward models' view:
the median Token2Text reward and the pitch head's accuracy on the tokens (a gap between the two
views is reward hacking), and the KL to the pretrained LM (Monte Carlo: mean log π_θ(y) − log
π_ref(y) over the samples).

Usage: python benchmarks/tts.py [--steps 200] [--lr 3e-4] [--seeds 0 1] [--n 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from results_md import record_stdout


def evaluate(g, conds, recogniser, codec, t2t, head, seed: int, attribute: str = "pitch") -> dict:
    import torch

    from domains.tts.corpus import ATTRIBUTES
    from domains.tts.rewards import cer

    with torch.no_grad():
        cond = g.encode_condition(conds)
        x = g.sample(cond, generator=torch.Generator().manual_seed(10_000 + seed))
        ids, mask = g.sampled_targets(x)
        logp = -g.teacher_forced_nll(cond, ids, mask)
        with g.base_model():
            logp_ref = -g.teacher_forced_nll(cond, ids, mask)
        reward = t2t(x, conds).total.median().item()  # a few very short samples have huge CTC losses
        _, _, logits = head.model(x[..., g.vocab.codec_offset:g.vocab.codec_offset + g.vocab.codebook_size])
    wavs = [codec.to_audio(torch.tensor(c)) if c else torch.zeros(0) for c in g.codes(x)]
    hyp, attrs = recogniser.transcribe(wavs)
    wanted = [c[attribute] for c in conds]
    values = ATTRIBUTES[attribute]
    return {"cer": cer(hyp, [c["text"] for c in conds]),
            "attr_acc_audio": sum(a == w for a, w in zip(attrs[attribute], wanted)) / len(conds),
            "attr_acc_tokens": sum(values[i] == w for i, w in zip(logits[attribute].argmax(-1).tolist(), wanted))
            / len(conds),
            "token2text": reward, "kl": float((logp - logp_ref).mean()), "tokens": float(mask.sum(1).mean())}


def train(method: str, reward, steps: int, batch: int, seed: int, lr: float, kl: float, random_pitch: bool):
    import lightning as L

    from domains.tts.data import TTSDataModule
    from domains.tts.generator import CodecLMGenerator
    from rewardopt.methods.diffro import DiffRO
    from rewardopt.methods.reinforce import Reinforce

    L.seed_everything(seed, verbose=False)
    g = CodecLMGenerator("embedded:tiny-tts", full_finetune=True)
    rand = ["pitch"] if random_pitch else None  # MTR: training prompts ask for a random pitch level
    if method == "DiffRO":
        m = DiffRO(g, reward, kl_weight=kl, lr=lr, seed=seed, output_dir=f"runs/tts_bench/{method}_{seed}")
        dm = TTSDataModule(batch_size=batch, max_val=8, random_attributes=rand)
    else:
        m = Reinforce(g, reward, samples_per_prompt=2, kl_weight=kl, lr=lr, seed=seed,
                      output_dir=f"runs/tts_bench/{method}_{seed}")
        dm = TTSDataModule(batch_size=batch // 2, max_val=8, random_attributes=rand)
    t0 = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0).fit(m, datamodule=dm)
    return g, {"train_s": time.perf_counter() - t0, "train_nfe": g.counter.nfe}


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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl", type=float, default=0.1)
    p.add_argument("--out", default="runs/tts_bench")
    p.add_argument("--runs", nargs="+", default=["DiffRO-ASR", "REINFORCE-ASR", "DiffRO-MTR"],
                   choices=["DiffRO-ASR", "REINFORCE-ASR", "DiffRO-MTR"])
    args = p.parse_args()
    torch.set_num_threads(2)
    _, val = split(load_corpus(CORPUS)["items"])
    conds = [condition_of(i) for i in val[: args.n]]
    codec, recogniser = MelCodec.load(CODEC), AudioRecogniser.load()
    t2t, pitch = Token2TextReward(), AttributeReward("pitch")
    mtr = WeightedSum({"pitch": pitch, "token2text": t2t}, {"pitch": 1.0, "token2text": 0.5})
    rows = []

    def record(name, per):
        agg = {k: statistics.mean(r[k] for r in per) for k in per[0]}
        agg.update({f"{k}_sd": statistics.pstdev([r[k] for r in per]) for k in ("cer", "attr_acc_audio")})
        rows.append({"method": name, **agg})
        print(f"  {name:28s} " + " ".join(f"{k} {v:.3f}" for k, v in agg.items() if not k.endswith("_sd")), flush=True)

    base = CodecLMGenerator("embedded:tiny-tts", full_finetune=True)
    base.setup_trainable()
    record("pretrained", [evaluate(base, conds, recogniser, codec, t2t, pitch, s) for s in args.seeds])
    for method, reward, flip, label in (("DiffRO", t2t, False, "DiffRO-ASR"),
                                        ("Reinforce", t2t, False, "REINFORCE-ASR"),
                                        ("DiffRO", mtr, True, "DiffRO-MTR")):
        if label not in args.runs:
            continue
        per = []
        for s in args.seeds:
            g, info = train(method, reward, args.steps, args.batch, s, args.lr, args.kl, flip)
            per.append({**evaluate(g, conds, recogniser, codec, t2t, pitch, s), **info})
        record(label, per)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "tts.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    with record_stdout("tts", seeds=args.seeds, title="TTS codec LM: DiffRO vs REINFORCE"):
        print(f"\nTiny codec LM (GPT-2, 2 layers), {args.n} held-out texts x {len(args.seeds)} seeds; "
              f"{args.steps} steps of {args.batch} sequences, lr {args.lr}, beta {args.kl}; mean over seeds (± sd).\n")
        print("| method | CER (audio, recogniser) | pitch acc (audio) | pitch acc (reward head) "
              "| Token2Text reward (median) | KL to pretrained | tokens |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['cer']:.3f} ± {r['cer_sd']:.3f} "
                  f"| {r['attr_acc_audio']:.3f} ± {r['attr_acc_audio_sd']:.3f} "
                  f"| {r['attr_acc_tokens']:.3f} | {r['token2text']:.3f} | {r['kl']:.2f} | {r['tokens']:.1f} |")
        for r in rows:
            if "train_s" in r:
                print(f"{r['method']}: {r['train_s']:.0f} s training per seed, {r['train_nfe']:.0f} LM passes")
        print(f"wrote {args.out}/tts.json")


if __name__ == "__main__":
    main()
