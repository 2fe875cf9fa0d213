"""RatingStore: tokens kept only as sha256, queries and answers read back exactly, one answer per query,
answers that survive a killed process, and a refusal to replay answers into another bandit configuration."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import torch

from rewardopt.feedback.store import ConfigMismatch, RatingStore, hash_token
from tests.conftest import ROOT


def add_query(store: RatingStore, token_hash: str, t: int = 0, prompt: str = "two red circles"):
    g = torch.Generator().manual_seed(t)
    return store.add_query(token_hash, t, prompt, [2, 0], torch.randn(5, generator=g),
                           torch.randn(4, 3, generator=g), ["png-a", "png-b"])


@pytest.fixture
def store(tmp_path):
    s = RatingStore(tmp_path / "ratings.sqlite")
    yield s
    s.close()


def test_tokens_are_stored_only_as_their_sha256(store, tmp_path):
    tokens = store.issue_tokens(3)
    assert len(set(tokens)) == 3 and all(len(t) >= 40 for t in tokens)
    assert store.token_hash(tokens[1]) == hash_token(tokens[1])
    assert store.token_hash("not-a-token") is None and store.token_hash("") is None and store.token_hash(None) is None
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ratings.sqlite"))
    for t in tokens:
        assert t.encode() not in raw
        assert hash_token(t).encode() in raw


def test_queries_read_back_exactly_and_pending_is_the_oldest_unanswered(store):
    h = hash_token(store.issue_tokens(1)[0])
    q1 = add_query(store, h, t=0)
    q2 = add_query(store, h, t=1)
    back = store.query(q1.id)
    g = torch.Generator().manual_seed(0)
    context, actions = torch.randn(5, generator=g), torch.randn(4, 3, generator=g)
    assert back.context.dtype == torch.float64 and torch.equal(back.context, context.double())
    assert torch.equal(back.actions, actions.double()) and back.shown == [2, 0] and back.images == ["png-a", "png-b"]
    assert store.pending_query(h).id == q1.id
    store.add_answer(q1.id, [7, 3], {"t": 2})
    assert store.pending_query(h).id == q2.id
    assert store.pending_query(hash_token("someone else")) is None
    assert store.num_queries() == 2 and store.query("nope") is None


def test_one_answer_per_query(store):
    h = hash_token(store.issue_tokens(1)[0])
    q = add_query(store, h)
    first, new = store.add_answer(q.id, [7, 3], {"t": 2, "scores": [7, 3]})
    assert new and first.scores == [7, 3]
    again, new = store.add_answer(q.id, [1, 1], {"t": 99})
    assert not new and again.scores == [7, 3] and again.response == {"t": 2, "scores": [7, 3]}
    assert store.num_answers() == 1
    with pytest.raises(KeyError, match="unknown query"):
        store.add_answer("never-issued", [5, 5], {})


def test_answers_in_observation_order_and_per_token(store):
    a, b = (hash_token(t) for t in store.issue_tokens(2))
    qs = [add_query(store, h, t=i) for i, h in enumerate([a, b, a])]
    for q, s in zip(reversed(qs), ([1, 2], [3, 4], [5, 6])):  # answered in the reverse of the order issued
        store.add_answer(q.id, s, {})
    assert [x.scores for x in store.answers()] == [[1, 2], [3, 4], [5, 6]]
    assert [x.query.id for x in store.answers()] == [qs[2].id, qs[1].id, qs[0].id]
    assert [x.scores for x in store.answers(token_hash=a, newest_first=True)] == [[5, 6], [1, 2]]
    assert [x.scores for x in store.answers(limit=1, newest_first=True)] == [[5, 6]]


def test_a_failed_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?)", ("a" * 64,))
            raise RuntimeError("boom")
    assert store.num_tokens() == 0
    with pytest.raises(sqlite3.IntegrityError):  # a query for a token that does not exist
        add_query(store, "b" * 64)
    assert store.num_queries() == 0


def test_committed_answers_survive_a_killed_process(tmp_path):
    """The writer is SIGKILLed right after add_answer returns (no close, no checkpoint): a new store sees it all."""
    path = tmp_path / "ratings.sqlite"
    code = f"""
import os, signal, torch
from rewardopt.feedback.store import RatingStore, hash_token
s = RatingStore({str(path)!r})
h = hash_token(s.issue_tokens(1)[0])
q = s.add_query(h, 0, "one blue square", [1], torch.ones(3), torch.zeros(2, 4), ["png"])
s.add_answer(q.id, [9], {{"t": 1}})
print(q.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    qid = proc.stdout.strip()
    store = RatingStore(path)
    (answer,) = store.answers()
    assert answer.query.id == qid and answer.scores == [9] and answer.response == {"t": 1}
    assert torch.equal(answer.query.actions, torch.zeros(2, 4, dtype=torch.float64)) and store.num_tokens() == 1
    assert store._read("PRAGMA journal_mode")[0][0] == "wal"
    store.close()


def test_a_store_refuses_another_bandit_configuration_once_it_has_answers(store):
    store.check_fingerprint({"epsilon": 1.0, "seed": 0})
    store.check_fingerprint({"epsilon": 2.0, "seed": 0})  # no answers yet: the new configuration is recorded
    h = hash_token(store.issue_tokens(1)[0])
    store.add_answer(add_query(store, h).id, [5, 5], {})
    store.check_fingerprint({"epsilon": 2.0, "seed": 0})
    with pytest.raises(ConfigMismatch, match="differs in: seed"):
        store.check_fingerprint({"epsilon": 2.0, "seed": 1})


def test_nothing_about_a_rater_but_the_token_hash_is_stored(store):
    cols = {t: [r[1] for r in store._read(f"PRAGMA table_info({t})")] for t in ("tokens", "queries", "answers")}
    assert cols["tokens"] == ["hash"]
    assert cols["answers"] == ["seq", "query_id", "scores", "response"]
    assert set(cols["queries"]) == {"seq", "id", "token_hash", "t_issued", "prompt", "shown", "context", "actions",
                                    "num_candidates", "images"}
