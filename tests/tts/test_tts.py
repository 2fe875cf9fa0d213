"""TTS domain on the shipped assets (no espeak-ng needed): prompts and vocabulary, the codec LM
generates only codec tokens and saves/loads, the token rewards score real speech above shuffled
tokens and pass gradient to the LM through Gumbel-softmax tokens, the evaluation recogniser reads
held-out speech, and the DiffRO recipes run."""

import json

import pytest
import torch

from domains.tts.corpus import ATTRIBUTES
from domains.tts.data import CORPUS, TTSVocab, load_corpus, split
from domains.tts.generator import CodecLMGenerator
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(CORPUS)


def test_prompts_hold_tags_characters_and_separator():
    v = TTSVocab(128)
    p = v.prompt("Hi, you!", {"gender": "female", "rate": "slow"})
    assert p == [v.index["<female>"], v.index["<slow>"], *[v.index[c] for c in "hi you"], v.sep]
    with pytest.raises(ValueError, match="expected one of"):
        v.prompt("hi", {"pitch": "medium"})
    assert v.to_codes(torch.tensor([[v.codec_offset + 5, v.codec_offset + 7, v.eos, v.codec_offset + 1]])) == [[5, 7]]


def test_generator_samples_only_codec_tokens_and_round_trips(tmp_path):
    g = CodecLMGenerator(pretrained=None, max_new_tokens=12, hidden=32, layers=1)
    cond = g.encode_condition(["the red car", {"text": "a dog", "gender": "male", "pitch": "low", "rate": "fast"}])
    with torch.no_grad():
        x = g.sample(cond, generator=torch.Generator().manual_seed(0))
    ids = g.tokens(x)
    v = g.vocab
    assert (((ids >= v.codec_offset) | (ids == v.eos) | (ids == v.pad))).all()
    g.save_pretrained(tmp_path)
    g2 = CodecLMGenerator(pretrained=str(tmp_path), max_new_tokens=12)
    for a, b in zip(g2.lm.parameters(), g.lm.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="text"):
        g.encode_condition([{"gender": "male"}])


def test_token_rewards_prefer_real_speech_and_reach_the_lm(corpus):
    from domains.tts.rewards import TOKEN_MODEL, AttributeReward, Token2TextReward

    if not TOKEN_MODEL.is_file():
        pytest.skip("token model not trained")
    v = TTSVocab(corpus["codebook_size"])
    _, val = split(corpus["items"])
    items = val[:16]
    N = max(len(i["codes"]) for i in items)
    real = torch.zeros(len(items), N, len(v))
    shuffled = torch.zeros_like(real)
    g = torch.Generator().manual_seed(0)
    for b, i in enumerate(items):
        ids = torch.tensor(v.codec_ids(i["codes"]))
        real[b, torch.arange(len(ids)), ids] = 1
        shuffled[b, torch.arange(len(ids)), ids[torch.randperm(len(ids), generator=g)]] = 1
    conds = [{"text": i["text"], **{k: i[k] for k in ATTRIBUTES}} for i in items]
    t2t = Token2TextReward()
    assert t2t(real, conds).total.mean() > t2t(shuffled, conds).total.mean() + 0.5
    gender = AttributeReward("gender")
    flipped = [{**c, "gender": "male" if c["gender"] == "female" else "female"} for c in conds]
    assert gender(real, conds).total.mean() > gender(real, flipped).total.mean()
    # gradient reaches the LM through DiffRO's teacher-forced Gumbel-softmax tokens
    lm = CodecLMGenerator(pretrained=None, max_new_tokens=N, hidden=32, layers=1, full_finetune=True)
    lm.setup_trainable()
    ids, mask = lm.pad_targets([v.codec_ids(i["codes"]) for i in items[:4]], append_eos=True)
    soft, _ = lm.teacher_forced(lm.encode_condition(conds[:4]), ids)
    (t2t(soft * mask[..., None], conds[:4]).total.sum() + gender(soft, conds[:4]).total.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.trainable_parameters())


def test_recogniser_reads_held_out_codec_speech(corpus):
    from domains.tts.codec import MelCodec
    from domains.tts.data import CODEC
    from domains.tts.rewards import RECOGNISER, AudioRecogniser, cer

    if not RECOGNISER.is_file():
        pytest.skip("recogniser not trained")
    _, val = split(corpus["items"])
    codec, rec = MelCodec.load(CODEC), AudioRecogniser.load()
    items = val[:6]
    hyp, attrs = rec.transcribe([codec.to_audio(torch.tensor(i["codes"])) for i in items])
    assert cer(hyp, [i["text"] for i in items]) < 0.5
    assert sum(a == i["gender"] for a, i in zip(attrs["gender"], items)) >= 5
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes/tts").glob("*_tiny.yaml")
                                           if "rewardopt fit" in p.read_text()
                                           and not p.name.startswith(("pretrain", "train_"))))
def test_fine_tuning_recipes_run(recipe, tmp_path):
    from domains.tts.rewards import TOKEN_MODEL
    from rewardopt.cli import RewardOptCLI

    if not TOKEN_MODEL.is_file():
        pytest.skip("token model not trained")
    args = ["--config", str(ROOT / "recipes/tts" / recipe), "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks", "[]",
            "--model.init_args.output_dir", str(tmp_path / "out"), "--data.init_args.batch_size", "2",
            "--data.init_args.max_val", "2", "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=args, run=False)
    before = [p.detach().clone() for p in c.model.generator.trainable_parameters()]
    c.trainer.fit(c.model, datamodule=c.datamodule)
    assert any(not torch.equal(a, b) for a, b in zip(c.model.generator.trainable_parameters(), before))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["steps"] == 2 and s["samples"] == 4 * (2 if recipe.startswith("reinforce") else 1)


def _wav_frames(path):
    import wave

    from domains.tts.codec import SAMPLE_RATE

    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return w.getnframes()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes/tts").glob("*_tiny.yaml")
                                           if "rewardopt predict" in p.read_text()))
def test_steering_recipes_write_wavs_of_the_sampled_tokens(recipe, tmp_path):
    from domains.tts.codec import HOP, STACK
    from domains.tts.rewards import TOKEN_MODEL
    from rewardopt.cli import RewardOptCLI

    if not TOKEN_MODEL.is_file():
        pytest.skip("token model not trained")
    args = ["--config", str(ROOT / "recipes/tts" / recipe),
            "--model.init_args.generator.init_args.max_new_tokens", "12",
            "--model.init_args.output_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.max_val", "3", "--trainer.enable_progress_bar", "false"]
    if "budget" in (ROOT / "recipes/tts" / recipe).read_text():
        args += ["--model.init_args.budget", "48"]
    c = RewardOptCLI(args=args, run=False)
    c.trainer.predict(c.model, datamodule=c.datamodule)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["samples"] == 3 and s["nfe"] == 3 * s["expected_cost_per_sample"]["nfe"] > 3 * 12
    lines = (tmp_path / "samples" / "r0_b00000.txt").read_text().splitlines()
    codes = [[int(t) for t in line.split()] for line in lines]
    assert len(codes) == 3 and all(0 <= t < 128 for c_ in codes for t in c_)
    for j, c_ in enumerate(codes):  # each WAV lasts as long as its codes (STACK mel frames of HOP samples each)
        assert abs(_wav_frames(tmp_path / "samples" / f"r0_b00000_{j:03d}.wav") - len(c_) * STACK * HOP) <= HOP


def test_diffro_recipe_writes_before_and_after_audio(tmp_path):
    from domains.tts.rewards import TOKEN_MODEL
    from rewardopt.cli import RewardOptCLI

    if not TOKEN_MODEL.is_file():
        pytest.skip("token model not trained")
    args = ["--config", str(ROOT / "recipes/tts/diffro_asr_tiny.yaml"), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.output_dir", str(tmp_path / "out"),
            "--model.init_args.generator.init_args.max_new_tokens", "16", "--data.init_args.batch_size", "2",
            "--data.init_args.max_val", "2", "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=args, run=False)
    c.trainer.fit(c.model, datamodule=c.datamodule)
    folder = tmp_path / "out" / "before_after"
    conditions = (folder / "conditions.txt").read_text().splitlines()
    assert len(conditions) == 2 and all("text" in line for line in conditions)
    for stem in ("before", "after"):
        lines = (folder / f"{stem}.txt").read_text().splitlines()
        assert len(lines) == 2
        for j in range(2):
            assert _wav_frames(folder / f"{stem}_{j:03d}.wav") > 0 or not lines[j]


def test_random_attributes_change_only_the_training_requests():
    from domains.tts.data import TTSDataModule

    plain, rand = TTSDataModule(max_val=4), TTSDataModule(max_val=4, random_attributes=["pitch"])
    assert [t for _, t in plain.train_prompts] == [t for _, t in rand.train_prompts]
    assert rand.val_prompts == plain.val_prompts  # evaluation asks for the recording's own attributes
    changed = [a["pitch"] != b["pitch"] for (a, _), (b, _) in zip(plain.train_prompts, rand.train_prompts)]
    assert 0.35 < sum(changed) / len(changed) < 0.65
    assert all(a["gender"] == b["gender"] for (a, _), (b, _) in zip(plain.train_prompts, rand.train_prompts))
    with pytest.raises(ValueError, match="random_attributes"):
        TTSDataModule(random_attributes=["emotion"])
