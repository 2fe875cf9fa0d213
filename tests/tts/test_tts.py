"""TTS domain on the shipped assets (no espeak-ng needed): prompts and vocabulary, the codec LM
generates only codec tokens and saves/loads, the token rewards score real speech above shuffled
tokens and pass gradient to the LM through Gumbel-softmax tokens, the evaluation recogniser reads
held-out speech (the recipes run in tests/test_recipes.py, with this domain's output checks in
recipe_checks.py)."""

import pytest
import torch

from domains.tts.corpus import ATTRIBUTES
from domains.tts.data import CORPUS, TTSVocab, load_corpus, split
from domains.tts.generator import CodecLMGenerator


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


def test_token2text_too_short_output_gets_the_documented_reward_and_a_finite_gradient():
    """An output with fewer CTC frames than its text needs has an infinite CTC loss: its reward is
    ``too_short_reward`` (no gradient from that row), and the other rows' gradients stay finite and non-zero."""
    from domains.tts.rewards import TOKEN_MODEL, Token2TextReward

    if not TOKEN_MODEL.is_file():
        pytest.skip("token model not trained")
    r = Token2TextReward()
    v = r.vocab
    x = torch.zeros(2, 12, len(v))
    x[:, torch.arange(12), v.codec_offset + torch.arange(12) % 7] = 1
    x[0, 3:] = 0  # 3 tokens = 6 CTC frames: cannot spell 30 characters
    x.requires_grad_(True)
    out = r(x, ["a sentence far too long to fit", "hi"])
    assert out.total[0].item() == r.too_short_reward
    assert torch.isfinite(out.total).all()
    assert out.total[1].item() == pytest.approx(r(x[1:].detach(), ["hi"]).total.item(), abs=1e-5)  # row 1 unchanged
    out.total.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() > 0
    assert Token2TextReward(too_short_reward=-3.0)(x, ["a sentence far too long to fit", "hi"]).total[0] == -3.0


def test_codec_lm_pretraining_exports_the_best_held_out_nll_weights_without_dropout(tmp_path):
    """The exported LM holds the weights of the validation with the lowest val/nll (scripted here:
    3, 2, 2.5, 4 at steps 2, 4, 6, 8), not the last step's, and has no dropout."""
    import lightning as L

    from domains.tts.data import TTSDataModule
    from domains.tts.pretraining import CodecLMPretraining

    class Scripted(CodecLMPretraining):
        script = iter([3.0, 2.0, 2.5, 4.0])

        def held_out_metrics(self):
            return {"val/nll": next(self.script)}

    snapshots = {}

    class Snap(L.Callback):
        def on_validation_end(self, trainer, module):
            snapshots[trainer.global_step] = {k: v.clone() for k, v in module.generator.lm.state_dict().items()}

    g = CodecLMGenerator(pretrained=None, max_new_tokens=12, hidden=32, layers=1, dropout=0.1)
    m = Scripted(g, lr=1e-2, output_dir=str(tmp_path / "out"))
    dm = TTSDataModule(batch_size=2, val_batch_size=2, max_val=2, val_targets=True)
    L.Trainer(max_steps=8, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
              num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[Snap()]).fit(m, datamodule=dm)
    assert m.best_step == 4 and m.best_val == 2.0
    loaded = CodecLMGenerator(pretrained=str(tmp_path / "out"), max_new_tokens=12).lm
    assert all(torch.equal(v, snapshots[4][k]) for k, v in loaded.state_dict().items())
    assert not all(torch.equal(v, snapshots[8][k]) for k, v in loaded.state_dict().items())
    assert loaded.config.resid_pdrop == loaded.config.attn_pdrop == loaded.config.embd_pdrop == 0.0


def test_kv_cache_sampling_matches_full_passes():
    """Sampling with the key/value cache draws the same tokens, with the same log-probabilities (to
    float rounding) and the same counted NFE, as full passes over the prefix; grad mode bypasses it."""
    g = CodecLMGenerator(pretrained=None, max_new_tokens=16, hidden=32, layers=2)
    ref = CodecLMGenerator(pretrained=None, max_new_tokens=16, hidden=32, layers=2, kv_cache=False)
    ref.load_state_dict(g.state_dict())
    conds = ["the red car", {"text": "a dog", "gender": "male"}, "hello there friend"]  # left-padded prompts
    with torch.no_grad():
        xs = [m.sample(m.encode_condition(conds), generator=torch.Generator().manual_seed(3)) for m in (g, ref)]
    assert torch.equal(xs[0], xs[1])
    assert g.counter.nfe == ref.counter.nfe == 3 * 16
    cond = g.encode_condition(conds)
    with torch.no_grad():
        for i in range(16):
            assert torch.allclose(g.model_output(xs[0], i, cond), ref.model_output(xs[0], i, cond), atol=1e-4)
        # a different prefix (a search branching) falls back to a full pass
        other = xs[0].clone()
        other[:, 2] = g.from_tokens(torch.full((3,), g.vocab.codec_offset + 1))
        assert torch.allclose(g.model_output(other, 8, cond), ref.model_output(other, 8, cond), atol=1e-4)
    assert g._kv is not None
    out = g.model_output(xs[0], 5, cond)  # grad on: the base class's differentiable full pass
    assert torch.allclose(out, ref.model_output(xs[0], 5, cond), atol=1e-4)
