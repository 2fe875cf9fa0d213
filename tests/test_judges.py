"""Judges: the HTTP judge against a real local server with injected faults, log-prob scoring,
the circuit breaker, the API key's handling, and the in-process VLM judge."""

import logging
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


@pytest.mark.parametrize("fault", ["500", "malformed", "drop", "slow"])
def test_each_fault_is_retried_and_counted(fault):
    with JudgeServer(faults={0: fault}, slow_s=3.0) as srv:
        j = judge(srv, timeout_s=1.0, max_workers=1)
        out = j(images(2), ["p", "p"])
    assert j.stats["retries"] == 1 and j.stats["failures"] == 0
    assert out.info["failed"] == 0 and torch.isfinite(out.total).all()
    if fault == "slow":
        assert j.stats["timeouts"] == 1


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
        j = judge(srv, on_failure=0.0, retries=0, max_workers=1, breaker_threshold=2, breaker_cooldown_s=0.5, cache_size=0)
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


def test_parse_score():
    assert parse_score("blah 3 things.\nScore: 7", None, 1, 9) == 7
    assert parse_score("**Score:** 4", None, 1, 9) == 4
    assert parse_score("I give it 12, no, 8", None, 1, 9) == 8
    lp = [{"token": "Score", "logprob": 0.0}, {"token": "6", "logprob": -0.1,
          "top_logprobs": [{"token": "6", "logprob": -0.5108}, {"token": "7", "logprob": -0.9163}, {"token": "x", "logprob": -3}]}]
    assert parse_score("Score: 6", lp, 1, 9) == pytest.approx(6.4, abs=1e-3)
    with pytest.raises(ValueError, match="no score in"):
        parse_score("I cannot rate this.", None, 1, 9)
    with pytest.raises(ValueError, match="no score in"):
        parse_score("Score: 10", None, 1, 9)


def test_videos_are_sent_as_a_grid_of_key_frames():
    from io import BytesIO

    from PIL import Image

    video = torch.rand(8, 3, 16, 20)
    img = Image.open(BytesIO(to_png(video)))
    assert img.size == (40, 32)  # 2x2 grid of 20x16 frames
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
    with pytest.raises(ValueError, match="single-digit"):
        TransformersJudge(str(tiny_vlm_dir), score_max=10)
