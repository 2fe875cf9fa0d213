"""Judges: the HTTP judge against a real local server with injected faults, log-prob scoring,
the circuit breaker, the API key's handling, and the in-process VLM judge."""

import logging
import math
import multiprocessing
import pickle
import time

import pytest
import torch

from rewardopt.rewards.base import RewardError
from rewardopt.rewards.judges import OpenAIJudge, TransformersJudge, parse_score, to_png
from rewardopt.testing.judge_server import JudgeServer, blueness_score


def images(n=4, blue=2):
    x = torch.full((n, 3, 16, 16), 0.5)
    x[:blue, 2], x[:blue, :2] = 1.0, 0.0  # the first `blue` images are pure blue
    for i in range(n):
        x[i] += 0.01 * i  # distinct content: no cache hits across samples
    return x.clamp(0, 1)


def judge(srv, **kw):
    kw = {"retries": 2, "backoff_s": 0.01, "timeout_s": 2.0, "max_workers": 4, **kw}
    return OpenAIJudge(srv.base_url, "test-model", **kw)


def test_scores_follow_the_server_and_use_logprobs():
    x = images()
    with JudgeServer() as srv:
        out = judge(srv)(x, ["a blue square"] * 4)
        text_only = judge(srv, use_logprobs=False, cache_size=0)(x, ["a blue square"] * 4)
    expected = torch.tensor([blueness_score(to_png(img)) for img in x])
    assert (out.total[:2] > out.total[2:].max()).all()
    assert torch.allclose(out.total, expected, atol=0.15), "log-prob expectation recovers the continuous score"
    assert torch.equal(text_only.total, expected.round()), "without log-probs: the integer in the text"
    assert srv.requests == 8


@pytest.mark.parametrize("fault", ["500", "malformed", "drop", "slow", "stray_digits", "malformed_logprobs"])
def test_each_fault_is_retried_and_counted(fault):
    with JudgeServer(faults={0: fault}, slow_s=3.0) as srv:
        j = judge(srv, timeout_s=1.0, max_workers=1)
        out = j(images(2), ["p", "p"])
    assert j.stats["retries"] == 1 and j.stats["failures"] == 0
    assert out.info["failed"] == 0 and torch.isfinite(out.total).all()
    if fault == "slow":
        assert j.stats["timeouts"] == 1


@pytest.mark.parametrize("fault", ["stray_digits", "malformed_logprobs"])
@pytest.mark.parametrize("use_logprobs", [True, False])
def test_stray_digit_answers_fail_through_the_client(fault, use_logprobs):
    """An answer without "Score: N" is a failure, counted by the policy: never its stray digit "2"."""
    x = images(1, blue=1)
    with JudgeServer(fault_fn=lambda i: fault) as srv:
        j = judge(srv, retries=1, on_failure=-1.0, use_logprobs=use_logprobs, breaker_threshold=None)
        out = j(x, ["p"])
    assert out.total.tolist() == [-1.0] and out.info["failed"] == 1 and srv.requests == 2
    with JudgeServer(faults={0: fault}) as srv:
        j = judge(srv, retries=1, use_logprobs=use_logprobs, logprob_score="top1")
        out = j(x, ["p"])
    assert out.total.item() == round(blueness_score(to_png(x[0]))) and j.stats["retries"] == 1


def test_judge_options_are_checked():
    with JudgeServer() as srv:
        with pytest.raises(ValueError, match="logprob_score"):
            judge(srv, logprob_score="median")
        with pytest.raises(ValueError, match="score_marker"):
            judge(srv, score_marker="  ")


def test_persistent_failures_follow_the_policy():
    with JudgeServer(fault_fn=lambda i: "500" if i % 2 == 0 else None) as srv:
        # retries rescue every sample: attempts alternate between failing and succeeding
        j = judge(srv, max_workers=1, retries=1, breaker_threshold=None)
        assert j(images(3), ["p"] * 3).info["failed"] == 0
    with JudgeServer(fault_fn=lambda i: "500") as srv:
        j = judge(srv, on_failure=-1.0, breaker_threshold=None)
        out = j(images(3), ["p"] * 3)
        assert out.total.tolist() == [-1.0] * 3 and out.info["failed"] == 3 and j.stats["failures"] == 3
        with pytest.raises(RewardError, match="failed after 3 attempts"):
            judge(srv, on_failure="raise", breaker_threshold=None)(images(1), ["p"])


def test_circuit_breaker_stops_calling_a_dead_server():
    with JudgeServer(fault_fn=lambda i: "500") as srv:
        j = judge(srv, on_failure=0.0, retries=0, max_workers=1, breaker_threshold=2, breaker_cooldown_s=0.5,
                  cache_size=0)
        j(images(2), ["p"] * 2)
        assert j.stats["breaker_opened"] == 1 and srv.requests == 2
        out = j(images(3), ["p"] * 3)  # open: rejected without a request
        assert srv.requests == 2 and j.stats["breaker_rejections"] == 3 and out.info["failed"] == 3
        time.sleep(0.6)
        srv.fault_fn = lambda i: None  # the server recovers; after the cool-down one call goes through
        out = j(images(2), ["p"] * 2)
        assert srv.requests == 4 and out.info["failed"] == 0 and not j.breaker_open


def test_api_key_is_sent_but_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-very-secret")
    caplog.set_level(logging.DEBUG)
    with JudgeServer(fault_fn=lambda i: "500") as srv:
        j = judge(srv, api_key_env="JUDGE_TEST_KEY", on_failure=0.0, retries=1, breaker_threshold=None)
        j(images(1), ["p"])
        with pytest.raises(RewardError) as err:
            judge(srv, api_key_env="JUDGE_TEST_KEY", retries=0, breaker_threshold=None)(images(1), ["p"])
    assert srv.auth_headers[0] == "Bearer sk-very-secret"
    assert "sk-very-secret" not in caplog.text and "sk-very-secret" not in str(err.value)
    assert "sk-very-secret" not in repr(j.__dict__)


def test_concurrency_overlaps_latency():
    with JudgeServer(latency_s=0.2) as srv:
        j = judge(srv, max_workers=8, cache_size=0)
        t0 = time.perf_counter()
        j(images(16, blue=0), ["p"] * 16)
        dt = time.perf_counter() - t0
    assert dt < 16 * 0.2 / 3, f"16 requests at 0.2 s with 8 in flight took {dt:.2f}s"



def test_consecutive_requests_reuse_one_pooled_connection():
    with JudgeServer() as srv:
        j = judge(srv, max_workers=1, cache_size=0)
        j(images(4), ["p"] * 4)
        j(images(3), ["p"] * 3)
        assert (srv.requests, srv.connections) == (7, 1)  # keep-alive: one TCP connection for all
        j.close()  # the pool's connections close; the next call opens a new one
        assert j(images(1), ["p"]).info["failed"] == 0 and srv.connections == 2
        wide = judge(srv, max_workers=4, cache_size=0)
        wide(images(16), ["p"] * 16)
        wide(images(16), ["q"] * 16)
        assert srv.requests == 40 and srv.connections <= 2 + 4  # at most one per request in flight


def test_kept_alive_requests_do_not_wait_for_delayed_acks():
    """Headers and body are two writes: without TCP_NODELAY on both ends, each request on a kept-alive
    connection would stall ~40 ms (Nagle waiting for the peer's delayed ACK)."""
    with JudgeServer() as srv:
        j = judge(srv, max_workers=1, cache_size=0)
        j(images(1), ["warm"])
        t0 = time.perf_counter()
        j(images(20), ["p"] * 20)
        dt = time.perf_counter() - t0
    assert srv.connections == 1 and dt < 20 * 0.025, f"20 sequential requests took {dt:.2f}s"

def test_a_dropped_keep_alive_connection_is_retried_on_a_new_one():
    with JudgeServer(faults={2: "drop"}) as srv:
        j = judge(srv, max_workers=1, cache_size=0)
        out = j(images(4), ["p"] * 4)
    assert out.info["failed"] == 0 and j.stats["retries"] == 1 and srv.connections == 2


def test_judge_pickles_and_forks_without_its_connections():
    with JudgeServer() as srv:
        j = judge(srv, max_workers=1, cache_size=0)
        j(images(1), ["p"])
        clone = pickle.loads(pickle.dumps(j))  # DDP spawn / checkpoint hparams
        assert clone(images(2), ["p"] * 2).info["failed"] == 0 and srv.connections == 2
        child = multiprocessing.get_context("fork").Process(target=_score_or_fail, args=(j,))
        child.start()
        child.join(30)
        assert child.exitcode == 0 and srv.connections == 3  # the child opened its own connection
        assert j(images(2), ["q"] * 2).info["failed"] == 0 and srv.connections == 3  # the parent keeps its own


def _score_or_fail(j):
    raise SystemExit(0 if j(images(2), ["r"] * 2).info["failed"] == 0 else 1)


def test_unreachable_server_fails_with_the_url_and_never_the_key(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-very-secret")
    with JudgeServer() as srv:
        url = srv.base_url
    j = OpenAIJudge(url, "m", api_key_env="JUDGE_TEST_KEY", retries=0, timeout_s=2.0, on_failure="raise")
    with pytest.raises(RewardError, match="ConnectionError") as err:
        j(images(1), ["p"])
    assert url in str(err.value) and "sk-very-secret" not in str(err.value)
    assert err.value.__cause__.__context__ is None  # the client's error (and its request's headers) is not kept

def lp_of(tokens, alts=None):
    """OpenAI-format log-probs for ``tokens``; ``alts`` maps a token index -> {alternative: probability}."""
    alts = alts or {}
    out = []
    for i, t in enumerate(tokens):
        ranked = sorted(alts.get(i, {t: 1.0}).items(), key=lambda a: -a[1])
        top = [{"token": a, "logprob": math.log(p)} for a, p in ranked]
        own = next((a["logprob"] for a in top if a["token"] == t), -5.0)
        out.append({"token": t, "logprob": own, "top_logprobs": top})
    return out


def test_parse_score():
    assert parse_score("blah 3 things.\nScore: 7", None, 1, 9) == 7
    assert parse_score("**Score:** 4", None, 1, 9) == 4
    assert parse_score("**Score**: 4.", None, 1, 9) == 4
    assert parse_score("Score: 3 at first; on reflection, score: 8", None, 1, 9) == 8
    alts = [{"token": "6", "logprob": -0.5108}, {"token": "7", "logprob": -0.9163}, {"token": "x", "logprob": -3}]
    lp = [{"token": "Score", "logprob": 0.0}, {"token": ":", "logprob": 0.0}, {"token": " 6", "logprob": -0.1,
          "top_logprobs": alts}]
    assert parse_score("Score: 6", lp, 1, 9) == pytest.approx(6.4, abs=1e-3)
    with pytest.raises(ValueError, match="no score"):
        parse_score("I cannot rate this.", None, 1, 9)
    with pytest.raises(ValueError, match=r"outside \[1, 9\]"):
        parse_score("Score: 10", None, 1, 9)


def test_parse_score_rejects_stray_digits():
    """Digits that are not the answer after the marker are never a score (issue 12.1)."""
    with pytest.raises(ValueError, match="no score"):
        parse_score("I cannot rate 2 images.", None, 1, 9)
    with pytest.raises(ValueError, match="no score"):
        parse_score("I give it 12, no, 8", None, 1, 9)
    text = ["I", " cannot", " rate", " ", "2", " images", "."]
    with pytest.raises(ValueError, match="no score"):
        parse_score("".join(text), lp_of(text, {4: {"2": 0.7, "3": 0.3}}), 1, 9)
    with pytest.raises(ValueError, match="not an integer"):
        parse_score("Score: 7.5", None, 1, 9)


def test_parse_score_logprobs_score_the_token_right_after_the_last_marker():
    tokens = ["Score", ":", " ", "7", "/", "9"]
    lp = lp_of(tokens, {3: {"6": 0.2, "7": 0.6, "8": 0.2}, 5: {"9": 1.0}})
    assert parse_score("Score: 7/9", lp, 1, 9) == pytest.approx(7.0, abs=1e-6)
    assert parse_score("Score: 7/9", None, 1, 9) == 7
    # "...3 cats... Score: 10": the answer 10 is out of range (whether "10" is one token or two)
    for tokens in (["There", " are", " ", "3", " cats", ".", "\n", "Score", ":", " ", "1", "0"],
                   ["There", " are", " 3", " cats", ".", "\n", "Score", ":", " 10"]):
        alts = {i: {"3": 0.9, "4": 0.1} for i, t in enumerate(tokens) if t.strip() == "3"}
        with pytest.raises(ValueError, match=r"outside \[1, 9\]"):
            parse_score("".join(tokens), lp_of(tokens, alts), 1, 9)
    # the marker is tied to the last occurrence; earlier markers (e.g. an echoed template) are ignored
    tokens = ["Answer", " with", " Score", ":", " N", ".", " Score", ":", " ", "5"]
    assert parse_score("".join(tokens), lp_of(tokens, {9: {"5": 0.5, "6": 0.5}}), 1, 9) == pytest.approx(5.5)


def test_parse_score_markers_and_top1():
    reasoning = "Reasoning: the dog is there, 2 legs missing.\nAnswer: 6"
    assert parse_score(reasoning, None, 1, 9, markers=("Answer:",)) == 6  # Free²Guide's template's marker
    assert parse_score("Rating: 4", None, 1, 9, markers=("Rating:",)) == 4
    with pytest.raises(ValueError, match="no score"):
        parse_score("Score: 4", None, 1, 9, markers=("Rating:",))
    tokens = ["Answer", ":", " ", "7", "."]
    lp = lp_of(tokens, {3: {"6": 0.6, "7": 0.4, "x": 0.0001}})
    assert parse_score("Answer: 7.", lp, 1, 9, markers=("Answer:",)) == pytest.approx(6.4, abs=1e-3)
    # top-1 (Free²Guide's public code): the most likely in-range answer token, not the sampled one
    assert parse_score("Answer: 7.", lp, 1, 9, markers=("Answer:",), logprob_score="top1") == 6
    with pytest.raises(ValueError, match="logprob_score"):
        parse_score("Answer: 7.", lp, 1, 9, markers=("Answer:",), logprob_score="mean")


def test_videos_are_sent_as_a_grid_of_key_frames():
    from io import BytesIO

    from PIL import Image

    video = torch.rand(8, 3, 16, 20)
    img = Image.open(BytesIO(to_png(video)))
    assert img.size == (240, 192)  # 2x2 grid of 20x16 frames, each upscaled x6 (short side >= min_tile = 96)
    assert Image.open(BytesIO(to_png(video, min_tile=1))).size == (40, 32)  # no upscaling
    with pytest.raises(ValueError, match="images"):
        to_png(torch.rand(16, 16))


def test_judge_steers_free2guide_toward_blue():
    """End to end: Free²Guide with the HTTP judge picks bluer candidates than the plain sampler."""
    from rewardopt.methods.free2guide import Free2Guide
    from tests.conftest import tiny_generator

    g = tiny_generator(lora_rank=None, eta=1.0)
    prompts = ["a blue circle"] * 4
    with JudgeServer() as srv:
        j = judge(srv, max_workers=8)
        plain, _ = Free2Guide(g, j, num_candidates=1, guide_steps=4, save_samples=False).generate(prompts)
        steered, _ = Free2Guide(g, j, num_candidates=6, guide_steps=4, save_samples=False).generate(prompts)
        r_plain, r_steered = j(plain, prompts).total.mean(), j(steered, prompts).total.mean()
    assert r_steered > r_plain


def test_in_process_vlm_judge(tiny_vlm_dir):
    j = TransformersJudge(str(tiny_vlm_dir))
    x = images(3)
    out = j(x, ["a blue square"] * 3)
    assert out.total.shape == (3,) and ((out.total >= 1) & (out.total <= 9)).all()
    assert not torch.allclose(out.total, out.total[0].expand(3)), "the score depends on the image"
    again = TransformersJudge(str(tiny_vlm_dir), cache_size=0)(x, ["a blue square"] * 3)
    assert torch.allclose(out.total, again.total, atol=1e-5)
    top1 = TransformersJudge(str(tiny_vlm_dir), logprob_score="top1", cache_size=0)(x, ["a blue square"] * 3).total
    assert torch.equal(top1, top1.round()) and ((top1 >= 1) & (top1 <= 9)).all()
    with pytest.raises(ValueError, match="single-digit"):
        TransformersJudge(str(tiny_vlm_dir), score_max=10)


# --- parse_score review findings: markers, boundaries, continued numbers, two-digit scales, BPE tokens -----------

def test_parse_score_accepts_only_the_configured_marker():
    """"Answer:" is not a marker unless configured: "My score: 8 (answer: 3 is wrong)" is 8, not 3."""
    assert parse_score("My score: 8 (answer: 3 is wrong)", None, 1, 9) == 8
    with pytest.raises(ValueError, match="no score"):
        parse_score("Reasoning: fine.\nAnswer: 6", None, 1, 9)
    assert parse_score("Reasoning: fine.\nAnswer: 6", None, 1, 9, markers=("Answer:",)) == 6
    assert parse_score("Answer: 6. Score: 4", None, 1, 9, markers=("Answer:", "Score:")) == 4
    tokens = ["My", " score", ":", " ", "8", " (", "answer", ":", " ", "3", ")"]
    assert parse_score("".join(tokens), lp_of(tokens, {4: {"8": 0.5, "7": 0.5}, 9: {"3": 1.0}}), 1, 9) == 7.5
    with JudgeServer() as srv:
        assert judge(srv).markers == ("Score:",)
        assert judge(srv, score_marker="Answer:").markers == ("Answer:",)
        assert judge(srv, score_marker=["Answer:", "Score:"]).markers == ("Answer:", "Score:")


def test_parse_score_marker_needs_a_word_boundary():
    assert parse_score("Score: 7. Subscore: 2", None, 1, 9) == 7
    assert parse_score("Score: 7. Sub-score: 2; self-Score: 3", None, 1, 9) == 7  # a hyphen joins words
    assert parse_score("Notes: 3 dogs.\n(Score: 6)", None, 1, 9) == 6
    assert parse_score("__Score__: 5", None, 1, 9) == 5
    tokens = ["Score", ":", " ", "7", ".", " Sub", "score", ":", " ", "2"]
    assert parse_score("".join(tokens), lp_of(tokens), 1, 9) == 7


@pytest.mark.parametrize("text", ["Score: 1,000", "Score: 1e3", "Score: 2E+1", "Score: 7,5", "Score: 7.5"])
def test_parse_score_rejects_an_integer_that_the_number_continues(text):
    with pytest.raises(ValueError, match="not an integer"):
        parse_score(text, None, 1, 9)
    tokens = ["Score", ":", " " + text[len("Score: ")], text[len("Score: ") + 1:]]
    with pytest.raises(ValueError, match="not an integer"):
        parse_score(text, lp_of(tokens), 1, 9)


def test_parse_score_accepts_an_integer_followed_by_punctuation():
    for text in ("Score: 7.", "Score: 7, since", "Score: 7/9", "Score: 7 e.g.", "Score: 7.\n8 dogs"):
        assert parse_score(text, None, 1, 9) == 7, text


def test_parse_score_two_digit_scales_do_not_mix_prefix_tokens():
    """On a 1-10 scale " 1" may be the first token of "10": its probability is not p(1); the text value."""
    tokens = ["Score", ":", " 9"]
    lp = lp_of(tokens, {2: {" 9": 0.5, " 1": 0.5}})
    assert parse_score("Score: 9", lp, 1, 10) == 9.0
    assert parse_score("Score: 9", lp, 1, 10, logprob_score="top1") == 9.0
    assert parse_score("Score: 9", lp, 1, 9) == pytest.approx(5.0), "on 1-9, ' 1' is the answer 1"
    # single-token two-digit answers with no prefix candidate keep the expectation
    tokens = ["Score", ":", " 10"]
    assert parse_score("Score: 10", lp_of(tokens, {2: {" 10": 0.6, " 9": 0.4}}), 1, 10) == pytest.approx(9.6)
    # a scale 10-20: " 1" and " 2" are prefixes of in-range answers even though out of range themselves
    tokens = ["Score", ":", " 15"]
    assert parse_score("Score: 15", lp_of(tokens, {2: {" 15": 0.5, " 1": 0.5}}), 10, 20) == 15.0


def test_parse_score_normalises_bpe_tokens_and_falls_back_to_the_text():
    tokens = ["Score", ":", "Ġ7"]
    assert parse_score("Score: 7", lp_of(tokens, {2: {"Ġ7": 0.6, "Ġ8": 0.4}}), 1, 9) == pytest.approx(7.4)
    tokens = ["▁Score", ":", "▁", "7"]
    assert parse_score("Score: 7", lp_of(tokens, {3: {"7": 0.6, "6": 0.4}}), 1, 9) == pytest.approx(6.6)
    tokens = ["Score", ":", "Ġ7", "Ċ", "Good"]
    assert parse_score("Score: 7\nGood", lp_of(tokens, {2: {"Ġ7": 0.5, "Ġ6": 0.5}}), 1, 9) == pytest.approx(6.5)
    # tokens that do not spell the text (byte tokens, ids): the text's integer
    tokens = ["<0x53>", "core", ":", "<0x20>", "7"]
    assert parse_score("Score: 7", lp_of(tokens, {4: {"7": 0.5, "6": 0.5}}), 1, 9) == 7.0
    # a text the tokens spell keeps the log-prob path even with surrounding whitespace differences
    tokens = ["Score", ":", " 7", "\n"]
    assert parse_score("Score: 7", lp_of(tokens, {2: {" 7": 0.5, " 8": 0.5}}), 1, 9) == pytest.approx(7.5)


def test_server_logprob_tokens_spell_the_answer_so_the_expectation_is_used():
    """The client trusts log-probs only when their tokens spell the answer text; the test server's must,
    or every score silently falls back to the rounded integer in the text."""
    with JudgeServer(scorer=lambda png, lo, hi: 4.3) as srv:
        out = judge(srv)(images()[:1], ["a blue square"])
    assert abs(float(out.total[0]) - 4.3) < 0.1 and float(out.total[0]) != 4.0
