"""QA text domain: the knowledge base checks facts exactly, the tokenizer saves/loads like a real
one, the two-decoder BART's question loss reaches the answer decoder and the encoder, DRIL's two
branches, the packaged sentence encoder loads offline, the shipped model follows length tags far
more often than an untrained one, and a killed DRIL run resumes exactly (the recipes run in
tests/test_recipes.py, with this domain's output checks in recipe_checks.py)."""

import pytest
import torch

from domains.qa_text.data import build_tokenizer, corpus, tokenizer_texts
from domains.qa_text.kb import BUCKET_SENTENCES, build_examples, check_facts, make_towns
from domains.qa_text.model import EMBEDDED, TwoDecoderBart
from domains.qa_text.rewards import bucket_compliant, rouge_l
from tests.conftest import ROOT

SHIPPED = (EMBEDDED["embedded:tiny-qa"] / "bart").is_dir()


@pytest.fixture(scope="module")
def small():
    towns = make_towns(40, seed=3)
    ex = build_examples(towns, seed=3)
    return ex, {t.name: t for t in towns}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TwoDecoderBart(None, d_model=32, layers=1, vocab_size=400, n_towns=60, max_answer_tokens=40)


def test_gold_answers_are_all_true_facts_of_their_bucket_length(small):
    ex, kb = small
    for e in ex:
        assert check_facts(e["answer"], kb, e["town"]) == {"sentences": BUCKET_SENTENCES[e["bucket"]],
                                                           "facts": BUCKET_SENTENCES[e["bucket"]],
                                                           "correct": BUCKET_SENTENCES[e["bucket"]], "accuracy": 1.0}
        assert bucket_compliant(e["answer"], e["bucket"]) and e["town"] in e["question"]


def test_fact_check_catches_wrong_values_other_towns_and_non_facts(small):
    ex, kb = small
    e = next(x for x in ex if x["bucket"] == 1)
    town = kb[e["town"]]
    wrong = f"{town.name} was founded in {town.facts['founded'] + 1}. {town.sentence('river')}"
    assert check_facts(wrong, kb, town.name)["accuracy"] == 0.5
    other = next(t for n, t in kb.items() if n != town.name)
    assert check_facts(other.sentence("river"), kb, town.name)["correct"] == 0  # true, but about another town
    assert check_facts("The weather is mild. " + town.sentence("mayor"), kb, town.name)["accuracy"] == 0.5
    assert check_facts("", kb)["accuracy"] == 0.0
    assert rouge_l("who leads varno", "Who leads Varno?") == 1.0 and rouge_l("a b", "c d") == 0.0


@pytest.mark.parametrize("hyp, ref, lcs, n_hyp, n_ref", [
    ("the cat sat on the mat", "the cat is on the mat", 5, 6, 6),  # "the cat on the mat"
    ("police killed the gunman", "the gunman police killed", 2, 4, 4),  # Lin (2004): ROUGE-L 1/2
    ("a b c d", "a c e", 2, 4, 3),  # "a c"
    ("Who leads Varno?", "who, leads: VARNO!", 3, 3, 3),  # case and punctuation do not count
    ("state-of-the-art towns", "the state of the art", 4, 5, 5),  # non-alphanumerics separate words
    ("Hallin's mayor", "the mayor of Hallin s", 2, 3, 5),  # "hallin" "s" "mayor" vs ... "hallin" "s"
    ("leads", "leading", 0, 1, 1),  # no stemming
    ("", "who leads", 0, 0, 2),
])
def test_rouge_l_is_the_lcs_f_measure(hyp, ref, lcs, n_hyp, n_ref):
    p, r = (lcs / n_hyp if n_hyp else 0.0), lcs / n_ref
    assert rouge_l(hyp, ref) == pytest.approx(2 * p * r / (p + r) if lcs else 0.0)


def test_corpus_holds_out_whole_towns():
    train, val, kb = corpus(200, 0)
    assert {e["town"] for e in train}.isdisjoint({e["town"] for e in val})
    assert len(kb) == 200 and len(val) == 4 * 20
    assert [e["bucket"] for e in val[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(tmp_path, small):
    from transformers import AutoTokenizer

    ex, _ = small
    tok = build_tokenizer(tokenizer_texts(ex), 300)
    text = ex[5]["article"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok("<|l2|> x")["input_ids"]) < len(tok("<|l2 x")["input_ids"])  # the tag is one token
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_question_loss_reaches_the_answer_decoder_and_encoder(tiny_model, small):
    m = tiny_model
    ex, _ = small
    batch = ex[:4]
    ids = m.sample_answers(batch, generator=torch.Generator().manual_seed(0))
    assert (ids == m.eos).any(1).all()
    m.zero_grad()
    m.reconstruction_nll(batch, ids).sum().backward()
    grads = {name: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
             for name, mod in (("encoder_layers", m.bart.model.encoder.layers),
                               ("answer_decoder_layers", m.bart.model.decoder.layers),
                               ("question_decoder_layers", m.question_decoder.layers))}
    assert all(v > 0 for v in grads.values()), grads
    with torch.no_grad():  # decoder 2 reads the answer: another answer, another question loss
        other = m.sample_answers(batch, generator=torch.Generator().manual_seed(1))
        # untrained: small, not zero
        assert (m.reconstruction_nll(batch, ids) - m.reconstruction_nll(batch, other)).abs().max() > 0


def test_save_and_load_round_trip_and_plain_bart_checkpoints(tmp_path, tiny_model):
    m = tiny_model
    m.save_pretrained(tmp_path / "qa")
    again = TwoDecoderBart(str(tmp_path / "qa"))
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    m.bart.save_pretrained(tmp_path / "plain")  # e.g. a distilBART folder: decoder 2 starts as decoder 1
    m.tokenizer.save_pretrained(tmp_path / "plain")
    plain = TwoDecoderBart(str(tmp_path / "plain"))
    for a, b in zip(plain.question_decoder.layers.parameters(), plain.bart.model.decoder.layers.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        TwoDecoderBart(str(tmp_path / "missing"))


def test_dril_branches(tiny_model, small):
    from rewardopt.methods.dril import DRIL

    ex, _ = small
    m = tiny_model
    mle = DRIL(m, sample_prob=0.0, question_mle=True).loss_terms(ex[:4])  # pretraining: both decoders' MLE
    assert "reconstruction_nll" not in mle and torch.isclose(mle["loss"], mle["answer_nll"] + mle["question_nll"])
    dril = DRIL(m, sample_prob=1.0, reconstruction_weight=0.5).loss_terms(ex[:4])  # the reference: reconstruction only
    assert torch.isclose(dril["loss"], 0.5 * dril["reconstruction_nll"])
    with pytest.raises(TypeError, match="DRIL needs a TwoStageSeq2Seq model"):
        DRIL(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sample_prob"):
        DRIL(m, sample_prob=1.5)


def test_sentence_encoder_loads_offline_from_its_package(monkeypatch):
    from domains.qa_text.rewards import SentenceEncoder, minilm_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "site-packages" in str(minilm_path())
    enc = SentenceEncoder()
    e = enc(["The mayor of Varno is Anna Holm.", "Anna Holm leads the town of Varno.",
             "Prices rose in the bond market."])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.skipif(not SHIPPED, reason="tiny QA model not trained")
def test_shipped_model_follows_length_tags_far_more_than_an_untrained_one(tiny_model):
    _, val, kb = corpus()
    ex = val[:24]
    trained = TwoDecoderBart("embedded:tiny-qa").eval()
    rates = {}
    for name, m in (("untrained", tiny_model.eval()), ("trained", trained)):
        gen = m.generate(ex, generator=torch.Generator().manual_seed(0), greedy=False)
        rates[name] = sum(bucket_compliant(g["answer"], e["bucket"]) for g, e in zip(gen, ex)) / len(ex)
    assert rates["trained"] > rates["untrained"] + 0.4, rates
    gen = trained.generate(ex)
    assert sum(check_facts(g["answer"], kb, e["town"])["accuracy"] for g, e in zip(gen, ex)) / len(ex) > 0.3


@pytest.mark.skipif(not SHIPPED, reason="tiny QA model not trained")
def test_shipped_question_decoder_reads_the_numbers_of_the_generated_answer():
    """Decoder 2 attends to decoder 1 only (question_memory "answer"): the question it writes names the
    founding year that the *generated* answer states after its first sentence, right or wrong."""
    import re

    from domains.qa_text.kb import split_sentences

    _, val, _ = corpus()
    ex = [e for e in val[:96] if e["bucket"] >= 2 and e["focus"] != "history"][:32]
    m = TwoDecoderBart("embedded:tiny-qa").eval()
    assert m.question_memory == "answer"
    gen = m.generate(ex)
    hits = total = 0
    for g in gen:
        years = [y for s in split_sentences(g["answer"])[1:] for y in re.findall(r"founded in (\d+)", s)]
        if years:
            total += 1
            hits += f"founded in {years[0]}" in g["question"]
    assert total >= 0.8 * len(ex) and hits >= 0.8 * total, (hits, total)


@pytest.mark.skipif(not SHIPPED, reason="tiny QA model not trained")
def test_shipped_question_decoder_copies_small_year_corruptions_but_not_gross_ones():
    """Gold answers teacher-forced with the founding year changed (the reward's view of a wrong year):
    decoder 2 copies a small corruption (year − 1) into its question, but under a gross one (− 300) it
    writes the *true* year, which it reads from decoder 1's article-informed states. So DRIL's
    reconstruction reward can see small year errors, not gross ones (``TwoDecoderBart.reconstruction_nll``)."""
    _, val, kb = corpus()
    ex = [e for e in val[:256] if e["bucket"] >= 2 and e["focus"] != "history"][:32]
    m = TwoDecoderBart("embedded:tiny-qa").eval()
    named = {}
    for shift in (1, 300):
        years = [kb[e["town"]].facts["founded"] for e in ex]
        answers = [e["answer"].replace(f"It was founded in {y}.", f"It was founded in {y - shift}.")
                   for e, y in zip(ex, years)]
        assert all(a != e["answer"] for a, e in zip(answers, ex))
        qs = m.write_questions(ex, m.target(answers, m.max_answer_tokens))
        named[shift] = (sum(f"founded in {y - shift}," in q or f"founded in {y - shift} " in q
                            for q, y in zip(qs, years)),
                        sum(f"founded in {y}," in q or f"founded in {y} " in q for q, y in zip(qs, years)))
    assert named[1][0] >= 24, named  # small corruption: copied (measured 30 of 32)
    assert named[300][0] <= 3 and named[300][1] >= 16, named  # gross: not copied; the true year instead


def _cli(recipe, extra):
    from rewardopt.cli import RewardOptCLI

    return RewardOptCLI(args=["--config", str(ROOT / "recipes/qa_text" / recipe),
                              "--trainer.enable_progress_bar", "false", *extra], run=False)


def test_killed_dril_run_resumes_exactly(tmp_path):
    """2 steps + checkpoint, then a fresh process-like start resumed to 4 steps == 4 steps at once
    (branch draws and answer samples depend on the step, data order on the resumable sampler)."""
    tiny = ["--model.init_args.model.init_args.d_model", "32", "--model.init_args.model.init_args.n_towns", "60",
            "--model.init_args.model.init_args.vocab_size", "400",
            "--model.init_args.model.init_args.max_answer_tokens", "24",
            "--data.init_args.n_towns", "60", "--data.init_args.batch_size", "4",
            "--model.init_args.sample_prob", "0.5",
            # the schedule length depends on max_steps
            "--model.init_args.warmup_steps", "0", "--model.init_args.decay", "false",
            "--trainer.val_check_interval", "100"]

    def run(steps, folder, resume=False):
        ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
                "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=1",
                "--trainer.enable_checkpointing", "true"]
        c = _cli("pretrain_tiny.yaml", [*tiny, "--trainer.max_steps", str(steps),
                                        "--model.init_args.output_dir", str(folder),
                                        "--trainer.default_root_dir", str(folder),
                                        *(ckpt if folder.name != "straight" else [])])
        c.trainer.fit(c.model, datamodule=c.datamodule,
                      ckpt_path=str(tmp_path / "ckpt" / "last.ckpt") if resume else None)
        return c.model

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "killed")
    resumed = run(4, tmp_path / "killed", resume=True)
    assert resumed.global_step == 4 and resumed.sampled_steps == straight.sampled_steps > 0
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.skipif(not SHIPPED, reason="tiny QA model not trained")
def test_shipped_tokenizer_is_rebuilt_exactly_from_the_corpus():
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(EMBEDDED["embedded:tiny-qa"] / "tokenizer")
    rebuilt = build_tokenizer(tokenizer_texts(corpus()[0]), 1000)
    assert shipped.get_vocab() == rebuilt.get_vocab()


def test_answer_only_question_memory_still_trains_encoder_and_is_saved(tmp_path, small):
    ex, _ = small
    m = TwoDecoderBart(None, d_model=32, layers=1, vocab_size=400, n_towns=60, max_answer_tokens=30,
                       question_memory="answer")
    ids = m.sample_answers(ex[:3], generator=torch.Generator().manual_seed(0))
    src = m.source(ex[:3])
    enc = m.encode(src)
    _, h = m.answer_pass(enc, src["attention_mask"], ids)
    memory, mask = m._memory(enc, src["attention_mask"], h, ids != m.pad)
    assert memory.shape == h.shape and torch.equal(mask.bool(), ids != m.pad)  # decoder 1's states only
    m.reconstruction_nll(ex[:3], ids).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in m.bart.model.encoder.layers.parameters() if p.grad is not None) > 0
    m.save_pretrained(tmp_path)
    assert TwoDecoderBart(str(tmp_path)).question_memory == "answer"
    assert TwoDecoderBart(str(tmp_path), question_memory="answer+source").question_memory == "answer+source"
    with pytest.raises(ValueError, match="question_memory"):
        TwoDecoderBart(str(tmp_path), question_memory="source")


def test_length_and_fact_rewards_score_answers_against_their_example(small):
    from domains.qa_text.rewards import FactAccuracyReward, LengthBucketReward

    ex, kb = small
    e = next(x for x in ex if x["bucket"] == 2)  # 4 sentences
    short = " ".join(e["answer"].split(". ")[:1]).rstrip(".") + "."
    assert LengthBucketReward()([e["answer"], short], [e, e]).total.tolist() == [0.0, -3.0]
    assert FactAccuracyReward(kb)([e["answer"], "The weather is mild."], [e, e]).total.tolist() == [1.0, 0.0]
