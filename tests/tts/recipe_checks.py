"""TTS recipes' own checks for tests/test_recipes.py: steering writes codec codes and a WAV per
sample as long as its codes; fine-tuning counts its samples and writes before/after speech;
pretraining saves a model that loads back as trained."""

from __future__ import annotations

import wave

import torch


def wav_frames(path) -> int:
    from domains.tts.codec import SAMPLE_RATE

    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return w.getnframes()


def check_predict(run) -> None:
    from domains.tts.codec import HOP, STACK

    s = run.summary
    tokens = run.config("model.init_args.generator.init_args.max_new_tokens")
    assert s["nfe"] > s["samples"] * tokens  # more than plain sampling
    for f in sorted((run.out / "samples").glob("*.txt")):
        codes = [[int(t) for t in line.split()] for line in f.read_text().splitlines()]
        assert all(0 <= t < 128 for c in codes for t in c)
        for j, c in enumerate(codes):  # each WAV lasts as long as its codes (STACK mel frames of HOP samples each)
            assert abs(wav_frames(f.with_name(f"{f.stem}_{j:03d}.wav")) - len(c) * STACK * HOP) <= HOP


def check_fit(run) -> None:
    from rewardopt.methods.base import RewardFineTuning

    model = run.cli.model
    if isinstance(model, RewardFineTuning):
        s = run.summary
        per_prompt = run.config("model.init_args.samples_per_prompt") or 1
        assert s["samples"] == run.spec.steps * run.config("data.init_args.batch_size") * per_prompt
        folder = run.out / "before_after"
        conditions = (folder / "conditions.txt").read_text().splitlines()
        assert conditions and all("text" in line for line in conditions)
        for stem in ("before", "after"):
            lines = (folder / f"{stem}.txt").read_text().splitlines()
            assert len(lines) == len(conditions)
            for j in range(len(lines)):
                assert wav_frames(folder / f"{stem}_{j:03d}.wav") > 0 or not lines[j]
    from rewardopt.generators.autoregressive import CausalLMPretraining

    if isinstance(model, CausalLMPretraining):
        from domains.tts.generator import CodecLMGenerator

        loaded, trained = CodecLMGenerator(pretrained=str(run.out)).state_dict(), model.generator.state_dict()
        assert loaded and set(loaded) <= set(trained)
        for k, v in loaded.items():
            assert torch.equal(v, trained[k]), k
