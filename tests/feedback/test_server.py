"""The rating page: tokens, validation, idempotent answers and the bandit fed (s - 5) / 4 per shown candidate
(Flask's test client), and the real thing: ``rewardopt serve-ratings`` under waitress in a child process,
SIGKILLed and restarted, comes back with every answer and the same release, and its next query is the one
a bandit rebuilt in this test from the stored answers would choose."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("flask", reason="the rating page needs the `web` extra: pip install -e '.[web]'")
pytest.importorskip("waitress", reason="the rating page needs the `web` extra: pip install -e '.[web]'")

from rewardopt.feedback.bandit import PrivateKernelBandit  # noqa: E402
from rewardopt.feedback.kernels import RandomFourierFeatures  # noqa: E402
from rewardopt.feedback.server import (  # noqa: E402
    COOKIE,
    RatingError,
    RatingSession,
    ServerProcess,
    create_app,
    parse_scores,
)
from rewardopt.feedback.store import RatingStore, hash_token  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

RECIPE = ROOT / "recipes" / "feedback" / "serve_ratings_tiny.yaml"
EXPLORE = 4  # ratings before the release: two queries of two


def small_args(store) -> list[str]:
    """The shipped recipe with a 2-step sampler, a release after two queries, a free port."""
    return ["--config", str(RECIPE), "--store", str(store), "--port", "0",
            "--model.init_args.generator.init_args.num_steps=2", f"--model.init_args.explore_rounds={EXPLORE}",
            "--model.init_args.num_features=32", "--model.init_args.queries_per_token=2"]


@pytest.fixture(scope="module")
def session():
    from domains.images.stable_diffusion import StableDiffusionGenerator
    from rewardopt.feedback.embed import ColourLayoutEmbedder, SentenceEmbedder

    gen = StableDiffusionGenerator(pretrained="embedded:tiny-shapes", height=24, width=24, sampler="ddim",
                                   num_steps=2, guidance_scale=1.0, eta=1.0, gradient_checkpointing=False)
    return RatingSession(gen, SentenceEmbedder(), ColourLayoutEmbedder(grid=1, scale=4.0),
                         prompts=["two red circles", "one blue square", "three green triangles"], candidates=4,
                         show=2, explore_rounds=EXPLORE, num_features=32, display_scale=2, queries_per_token=2)


@pytest.fixture
def app(session, tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    session.replay(store)  # an empty store: a fresh bandit
    app = create_app(session, store)
    app.testing = True
    tokens = store.issue_tokens(2)
    yield app, store, tokens
    store.close()


def client_for(app, token):
    c = app.test_client()
    if token is not None:
        c.set_cookie(COOKIE, token)
    return c


def query_id(html: str) -> str:
    return re.search(r'name="query_id" id="query_id" value="([^"]+)"', html)[1]


def test_parse_scores():
    assert parse_scores(["7", 3, 9.0, " 1 "], 4) == [7, 3, 9, 1]
    for bad, msg in [(["10"], "candidate 1 .* got '10'"), (["0"], "got '0'"), ([5.5], "got 5.5"), ([""], "nothing"),
                     ([None], "nothing"), (["abc"], "'abc'"), ([True], "True"), ([-3], "-3")]:
        with pytest.raises(RatingError, match=msg) as e:
            parse_scores(bad, 1)
        assert e.value.status == 400
    with pytest.raises(RatingError, match="expected 2 scores"):
        parse_scores([5], 2)
    with pytest.raises(RatingError, match="a list"):
        parse_scores("55", 2)


def test_login_and_rating_through_the_page(app, session):
    app, store, (token, _) = app
    anon = app.test_client()
    assert 'name="token"' in anon.get("/").text
    bad = anon.post("/login", data={"token": "guess"})
    assert bad.status_code == 403 and "not recognised" in bad.text
    ok = anon.post("/login", data={"token": token})
    assert ok.status_code == 303 and COOKIE in ok.headers["Set-Cookie"] and "HttpOnly" in ok.headers["Set-Cookie"]
    assert "SameSite=Strict" in ok.headers["Set-Cookie"]

    page = anon.get("/").text  # the cookie from the login
    qid = query_id(page)
    q = store.query(qid)
    assert q.prompt in page and page.count("data:image/png;base64,") == 2 and len(q.shown) == 2
    assert q.t_issued == 0 and q.actions.shape == (4, 3) and q.token_hash == hash_token(token)
    assert anon.get("/").text.count(qid) >= 1 and store.num_queries() == 1  # a reload shows the same query

    S0, b0 = session.bandit.statistics()
    r = anon.post("/rate", data={"query_id": qid, "score_0": "9", "score_1": "1"})
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/?rated={qid}")
    assert session.bandit.t == 2 and session.bandit.observed_rewards == [1.0, -1.0]
    # the statistics gained exactly the two shown candidates' features, with rewards (9-5)/4 and (1-5)/4
    S, b = session.bandit.statistics()
    phi = session.bandit.features(session.bandit.joint(q.context, q.actions[q.shown])).double()
    assert torch.allclose(b - b0, phi[0] - phi[1], atol=1e-6) and torch.allclose(S - S0, phi.T @ phi, atol=1e-6)

    after = anon.get(f"/?rated={qid}").text
    assert "9, 1" in after and 'id="done"' in after and query_id(after) != qid
    assert store.num_queries() == 2 and store.answer(qid).scores == [9, 1]


def test_bad_requests_are_refused_and_observe_nothing(app, session):
    app, store, (token, other) = app
    c, o = client_for(app, token), client_for(app, other)
    qid = c.get("/api/query").json["query_id"]
    cases = [
        (c.post("/api/rate", json={"query_id": qid, "scores": [5, 10]}), 400, "candidate 2 must be a whole number"),
        (c.post("/api/rate", json={"query_id": qid, "scores": [5]}), 400, "expected 2 scores"),
        (c.post("/api/rate", json={"query_id": "nope", "scores": [5, 5]}), 400, "unknown query"),
        (c.post("/api/rate", data="not json"), 400, "send JSON"),
        (o.post("/api/rate", json={"query_id": qid, "scores": [5, 5]}), 403, "another rater"),
        (client_for(app, "forged").post("/api/rate", json={"query_id": qid, "scores": [5, 5]}), 403, "unknown rater"),
        (client_for(app, None).get("/api/query"), 403, "no rater token"),
        (c.get("/api/release"), 409, "nothing released yet"),
    ]
    for r, status, msg in cases:
        assert r.status_code == status and msg in r.json["error"], (r.status_code, r.json)
    html = c.post("/rate", data={"query_id": qid, "score_0": "4"})  # score_1 missing
    assert html.status_code == 400 and "candidate 2" in html.text and "<html" in html.text
    html = client_for(app, None).post("/rate", data={"query_id": qid, "score_0": "4", "score_1": "4"})
    assert html.status_code == 403 and "no rater token" in html.text
    assert session.bandit.t == 0 and store.num_answers() == 0


def test_a_repeated_submission_is_idempotent(app, session):
    app, store, (token, _) = app
    c = client_for(app, token)
    qid = c.get("/api/query").json["query_id"]
    first = c.post("/api/rate", json={"query_id": qid, "scores": [6, 2]})
    again = c.post("/api/rate", json={"query_id": qid, "scores": ["6", "2"]})
    assert first.status_code == again.status_code == 200 and first.json == again.json
    assert first.json == {"query_id": qid, "scores": [6, 2], "rewards": [0.25, -0.75], "t": 2, "released": False}
    changed = c.post("/api/rate", json={"query_id": qid, "scores": [6, 3]})
    assert changed.status_code == 409 and "already answered" in changed.json["error"]
    form = c.post("/rate", data={"query_id": qid, "score_0": "6", "score_1": "2"})  # the same, from the page
    assert form.status_code == 303
    assert session.bandit.t == 2 and store.num_answers() == 1 and session.bandit.observed_rewards == [0.25, -0.75]


def replayed_bandit(store: RatingStore, epsilon=1.0, seed=0, num_features=32, in_dim=384 + 3,
                    noise_seed: int | None = None) -> PrivateKernelBandit:
    """The bandit rebuilt here, independently of the server: the stored answers' vectors, in order, with the
    store's noise seed (unless ``noise_seed``)."""
    b = PrivateKernelBandit(RandomFourierFeatures(in_dim, num_features, 1.0, "rbf", seed=seed), epsilon, 1e-5,
                            explore_rounds=EXPLORE, seed=seed, ratings_per_user=4,
                            noise_seed=store.noise_seed() if noise_seed is None else noise_seed)
    for a in store.answers():
        for j, s in enumerate(a.scores):
            b.observe(a.query.context, a.query.actions[a.query.shown[j]], (s - 5) / 4)
    return b


def test_replay_rebuilds_the_same_release_and_choices(app, session, tmp_path):
    app, store, (token, _) = app
    c = client_for(app, token)
    for scores in ([9, 2], [3, 8]):
        qid = c.get("/api/query").json["query_id"]
        assert c.post("/api/rate", json={"query_id": qid, "scores": scores}).json["released"] == (scores == [3, 8])
    assert session.bandit.released and session.bandit.t == EXPLORE
    theta = session.bandit.theta.clone()
    nxt = store.query(c.get("/api/query").json["query_id"])
    assert nxt.t_issued == EXPLORE  # handed out after the release: greedy
    ref = replayed_bandit(store)
    assert torch.equal(ref.theta, theta)
    assert nxt.shown == ref.select(nxt.context, nxt.actions, k=2)
    assert c.get("/api/release").json["theta"] == theta.tolist()
    session.replay(store)  # what a restart does
    assert torch.equal(session.bandit.theta, theta) and session.bandit.t == EXPLORE


def test_a_token_is_one_person_capped_at_its_exploration_queries(session, tmp_path):
    """queries_per_token=2: the sensitivity counts 2 x 2 ratings per token, a third exploration query is refused, and
    after the release (whose estimate no later rating enters) the token may go on rating."""
    store = RatingStore(tmp_path / "cap.sqlite")
    session.replay(store)
    app = create_app(session, store)
    app.testing = True
    a, b = store.issue_tokens(2)
    ca, cb = client_for(app, a), client_for(app, b)
    assert session.bandit.ratings_per_user == 4 and session.status(store)["queries_per_token"] == 2
    session.bandit.explore_rounds = EXPLORE + 2  # one more query than one token may answer before the release
    try:
        for _ in range(2):
            assert ca.post("/api/rate", json={"query_id": ca.get("/api/query").json["query_id"],
                                              "scores": [5, 6]}).status_code == 200
        refused = ca.get("/api/query")
        assert refused.status_code == 403 and "answered its 2 queries" in refused.json["error"]
        page = ca.get("/")  # the page says so too
        assert page.status_code == 403 and "answered its 2 queries" in page.get_data(as_text=True)
        assert cb.post("/api/rate", json={"query_id": cb.get("/api/query").json["query_id"],
                                          "scores": [2, 3]}).json["released"]
        assert ca.get("/api/query").status_code == 200  # after the release: greedy queries, not capped
    finally:
        session.bandit.explore_rounds = EXPLORE
        store.close()
    with pytest.raises(ValueError, match="queries_per_token"):
        RatingSession(session.generator, session.context_embedder, session.action_embedder, prompts=["x"],
                      queries_per_token=0)


def test_exploration_queries_do_not_depend_on_the_ratings(session, tmp_path):
    """Two stores rated differently hand out the same prompts, candidates and shown sets until the release: the
    exploration is data-independent on the server path too."""
    handed = []
    for name, scores in (("one", [[9, 9], [1, 1]]), ("two", [[1, 2], [8, 3]])):
        store = RatingStore(tmp_path / f"{name}.sqlite")
        session.replay(store)
        app = create_app(session, store)
        app.testing = True
        c = client_for(app, store.issue_tokens(1)[0])
        got = []
        for sc in scores:
            q = c.get("/api/query").json
            got.append((q["prompt"], q["shown"], q["images"], q["t_issued"]))
            c.post("/api/rate", json={"query_id": q["query_id"], "scores": sc})
        assert session.bandit.released
        handed.append(got)
        store.close()
    assert handed[0] == handed[1]


def test_create_app_refuses_a_session_not_replayed_from_its_store(session, tmp_path):
    store = RatingStore(tmp_path / "fresh.sqlite")
    session.bandit = session.new_bandit()  # its own fresh secret noise seed, not the store's
    with pytest.raises(RuntimeError, match="replay"):
        create_app(session, store)
    store.close()


def test_the_noise_seed_is_the_stores_secret_not_the_recipes(app, session, tmp_path):
    """Two stores under one recipe (same public seed) draw different noise seeds, so the same ratings give
    different releases; the seed stays in the store (replay uses it) and is not in the saved release."""
    from rewardopt.feedback.reward import save_release

    app, store, (token, _) = app
    c = client_for(app, token)
    for scores in ([9, 2], [3, 8]):
        c.post("/api/rate", json={"query_id": c.get("/api/query").json["query_id"], "scores": scores})
    assert session.bandit.released and session.bandit.noise_seed == store.noise_seed()
    other = RatingStore(tmp_path / "other.sqlite")
    assert other.noise_seed() != store.noise_seed()
    twin, twin_other = replayed_bandit(store), replayed_bandit(store, noise_seed=other.noise_seed())
    assert torch.equal(twin.theta, session.bandit.theta) and not torch.allclose(twin_other.theta, twin.theta)
    folder = save_release(tmp_path / "release", session.bandit, session.context_embedder, session.action_embedder)
    text = "".join(f.read_text(errors="replace") for f in folder.iterdir() if f.suffix == ".json")
    assert str(store.noise_seed()) not in text and "noise_seed" not in text
    assert str(store.noise_seed()) not in json.dumps(c.get("/api/status").json) + json.dumps(
        c.get("/api/release").json)
    other.close()


def get(url, token, path):
    req = urllib.request.Request(url + path.lstrip("/"), headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def post(url, token, path, body):
    req = urllib.request.Request(url + path.lstrip("/"), data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_waitress_process_killed_and_restarted_keeps_every_rating(tmp_path):
    db = tmp_path / "ratings.sqlite"
    with ServerProcess(small_args(db), cwd=ROOT) as srv:
        url, token = srv.url, srv.token
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/") and token
        for scores in ([8, 2], [1, 7]):
            q = get(url, token, "/api/query")
            status, r = post(url, token, "/api/rate", {"query_id": q["query_id"], "scores": scores})
            assert status == 200 and r["scores"] == scores
        assert r == {"query_id": q["query_id"], "scores": [1, 7], "rewards": [-1.0, 0.5], "t": 4, "released": True}
        theta = get(url, token, "/api/release")["theta"]
        pending = get(url, token, "/api/query")  # the first greedy query, handed out before the crash
        assert post(url, token, "/api/rate", {"query_id": pending["query_id"], "scores": [0, 5]})[0] == 400
        srv.kill()  # SIGKILL: no shutdown code runs

    with ServerProcess(small_args(db), cwd=ROOT) as srv:
        assert srv.token is None  # the store still has its token
        assert re.search(r"2 answers replayed, t=4, released=True", "".join(srv.output))
        url = srv.url
        status = get(url, token, "/api/status")
        assert status["t"] == 4 and status["answers"] == 2 and status["released"]
        assert math.isclose(status["epsilon_spent"], 1.0, rel_tol=1e-6)
        assert get(url, token, "/api/release")["theta"] == theta  # the same release, bit for bit
        again = get(url, token, "/api/query")
        assert again["query_id"] == pending["query_id"] and again["shown"] == pending["shown"]
        # a repeat of an answer given before the crash: the stored response, nothing observed
        first = RatingStore(db).answers()[0]
        assert post(url, token, "/api/rate", {"query_id": first.query.id, "scores": first.scores}) == (
            200, first.response)
        status, r = post(url, token, "/api/rate", {"query_id": again["query_id"], "scores": [9, 9]})
        assert status == 200 and r["t"] == 6 and get(url, token, "/api/status")["t"] == 6
        srv.kill()

    store = RatingStore(db)
    ref = replayed_bandit(store)
    assert ref.theta.tolist() == theta and ref.t == 6
    q = store.query(pending["query_id"])
    assert q.t_issued == 4 and q.shown == ref.select(q.context, q.actions, k=2)
    assert [a.scores for a in store.answers()] == [[8, 2], [1, 7], [9, 9]]
    store.close()


def test_the_command_issues_tokens_and_explains_a_config_mistake(tmp_path, capsys, monkeypatch):
    from rewardopt.cli import main

    monkeypatch.chdir(ROOT)
    db = tmp_path / "ratings.sqlite"
    main(["serve-ratings", "--config", str(RECIPE), "--store", str(db), "--issue-token", "3"])
    tokens = capsys.readouterr().out.split()
    assert len(tokens) == 3
    store = RatingStore(db)
    assert all(store.token_hash(t) == hash_token(t) for t in tokens) and store.num_tokens() == 3
    store.close()
    with pytest.raises(SystemExit) as e:
        main(["serve-ratings", "--config", str(RECIPE), "--store", str(db), "--model.init_args.shw=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "shw" in err and len(err.strip().splitlines()) <= 3
    main(["serve-ratings"])
    assert "--issue-token" in capsys.readouterr().out
