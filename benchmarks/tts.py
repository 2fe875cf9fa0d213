"""DiffRO on the tiny codec LM: evaluation CER and attribute accuracy from decoded audio, against
the REINFORCE baseline with the same reward at equal steps.

Runs (each from the shipped pretrained LM, per seed):
* pretrained;
* DiffRO-ASR (Token2Text reward, β=0.1) and REINFORCE-ASR (same reward and β, 2 samples per text),
  ``--steps`` optimiser steps of ``--batch`` sequences each;
* DiffRO-MTR (gender head + 0.5·Token2Text), prompts asking for a gender.

Evaluation on ``--n`` held-out texts (prompted with their own attributes; for MTR with the opposite
gender, so following the request is a change): free-running samples (temperature 1) -> codes ->
audio (codec + Griffin-Lim) -> the separately trained recogniser: CER (torchaudio edit distance)
and gender accuracy from audio. Next to them, the reward models' view: the Token2Text reward and
the gender head's accuracy on the tokens (a gap between the two views is reward hacking), and the
KL to the pretrained LM (Monte Carlo: mean log π_θ(y) − log π_ref(y) over the samples).

Usage: python benchmarks/tts.py [--steps 100] [--seeds 0 1] [--n 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evaluate(g, conds, recogniser, codec, t2t, gender_head, seed: int) -> dict:
    import torch

    from domains.tts.rewards import cer

    with torch.no_grad():
        cond = g.encode_condition(conds)
        x = g.sample(cond, generator=torch.Generator().manual_seed(10_000 + seed))
        ids, mask = g.sampled_targets(x)
        logp = -g.teacher_forced_nll(cond, ids, mask)
        with g.base_model():
            logp_ref = -g.teacher_forced_nll(cond, ids, mask)
        reward = t2t(x, conds).total.mean().item()
        _, _, logits = gender_head.model(x[..., g.vocab.codec_offset:g.vocab.codec_offset + g.vocab.codebook_size])
    wavs = [codec.to_audio(torch.tensor(c)) if c else torch.zeros(0) for c in g.codes(x)]
    hyp, attrs = recogniser.transcribe(wavs)
    wanted = [c["gender"] for c in conds]
    head = ["male", "female"]
    return {"cer": cer(hyp, [c["text"] for c in conds]),
            "gender_acc_audio": sum(a == w for a, w in zip(attrs["gender"], wanted)) / len(conds),
            "gender_acc_tokens": sum(head[i] == w for i, w in zip(logits["gender"].argmax(-1).tolist(), wanted)) / len(conds),
            "token2text": reward, "kl": float((logp - logp_ref).mean()), "tokens": float(mask.sum(1).mean())}


def train(method: str, reward, steps: int, batch: int, seed: int, lr: float, kl: float, attributes_flip: bool):
    import lightning as L

    from domains.tts.data import TTSDataModule
    from domains.tts.generator import CodecLMGenerator
    from rewardopt.methods.diffro import DiffRO
    from rewardopt.methods.reinforce import Reinforce

    L.seed_everything(seed, verbose=False)
    g = CodecLMGenerator("embedded:tiny-tts", full_finetune=True)
    if method == "DiffRO":
        m = DiffRO(g, reward, kl_weight=kl, lr=lr, seed=seed, output_dir=f"runs/tts_bench/{method}_{seed}")
        dm = TTSDataModule(batch_size=batch, max_val=8)
    else:
        m = Reinforce(g, reward, samples_per_prompt=2, kl_weight=kl, lr=lr, seed=seed, output_dir=f"runs/tts_bench/{method}_{seed}")
        dm = TTSDataModule(batch_size=batch // 2, max_val=8)
    if attributes_flip:  # MTR: train on prompts asking for either gender, so the tag is what the reward checks
        import random

        rnd = random.Random(seed)
        dm.train_prompts = [({**c, "gender": rnd.choice(["male", "female"])}, t) for c, t in dm.train_prompts]
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
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl", type=float, default=0.1)
    p.add_argument("--out", default="runs/tts_bench")
    args = p.parse_args()
    torch.set_num_threads(2)
    _, val = split(load_corpus(CORPUS)["items"])
    conds = [condition_of(i) for i in val[: args.n]]
    flipped = [{**c, "gender": "male" if c["gender"] == "female" else "female"} for c in conds]
    codec, recogniser = MelCodec.load(CODEC), AudioRecogniser.load()
    t2t, gender = Token2TextReward(), AttributeReward("gender")
    mtr = WeightedSum({"gender": gender, "token2text": t2t}, {"gender": 1.0, "token2text": 0.5})
    rows = []

    def record(name, per):
        agg = {k: statistics.mean(r[k] for r in per) for k in per[0]}
        agg.update({f"{k}_sd": statistics.pstdev([r[k] for r in per]) for k in ("cer", "gender_acc_audio")})
        rows.append({"method": name, **agg})
        print(f"  {name:28s} " + " ".join(f"{k} {v:.3f}" for k, v in agg.items() if not k.endswith("_sd")), flush=True)

    base = CodecLMGenerator("embedded:tiny-tts", full_finetune=True)
    base.setup_trainable()
    record("pretrained (own gender)", [evaluate(base, conds, recogniser, codec, t2t, gender, s) for s in args.seeds])
    record("pretrained (flipped gender)", [evaluate(base, flipped, recogniser, codec, t2t, gender, s) for s in args.seeds])
    for method, reward, flip, label in (("DiffRO", t2t, False, "DiffRO-ASR"), ("Reinforce", t2t, False, "REINFORCE-ASR"),
                                        ("DiffRO", mtr, True, "DiffRO-MTR (flipped gender)")):
        per = []
        for s in args.seeds:
            g, info = train(method, reward, args.steps, args.batch, s, args.lr, args.kl, flip)
            per.append({**evaluate(g, flipped if flip else conds, recogniser, codec, t2t, gender, s), **info})
        record(label, per)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "tts.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nTiny codec LM (GPT-2, 2 layers), {args.n} held-out texts x {len(args.seeds)} seeds; {args.steps} steps of "
          f"{args.batch} sequences, lr {args.lr}, beta {args.kl}; mean over seeds (± sd).\n")
    print("| method | CER (audio, recogniser) | gender acc (audio) | gender acc (reward head) | Token2Text reward | KL to pretrained | tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['cer']:.3f} ± {r['cer_sd']:.3f} | {r['gender_acc_audio']:.3f} ± {r['gender_acc_audio_sd']:.3f} | "
              f"{r['gender_acc_tokens']:.3f} | {r['token2text']:.3f} | {r['kl']:.2f} | {r['tokens']:.1f} |")
    for r in rows:
        if "train_s" in r:
            print(f"{r['method']}: {r['train_s']:.0f} s training per seed, {r['train_nfe']:.0f} LM passes")
    print(f"wrote {args.out}/tts.json")


if __name__ == "__main__":
    main()
