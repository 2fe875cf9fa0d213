"""A rating web page for the private kernel bandit: people score what the bandit chose to show them.

    rewardopt serve-ratings --config recipes/feedback/serve_ratings_tiny.yaml            # serve (waitress)
    rewardopt serve-ratings --config recipes/feedback/serve_ratings_tiny.yaml --issue-token 3   # print 3 tokens

Flow: a rater opens the page with their token (``/login?token=...`` or the form; the token goes into an
HttpOnly, SameSite=Strict cookie). The page shows a prompt (the context) and the ``show`` candidates that
``PrivateKernelBandit.select`` chose among ``candidates`` samples the generator proposed for it; the rater
gives each a 1-9 score, and every score s becomes one ``observe`` with reward (s - 5) / 4.

Durability (``rewardopt.feedback.store``): every query handed out is stored (its context and all K action
embeddings, and the shown images) before the page shows it; an answer is committed before the bandit sees it.
On start the bandit is rebuilt by replaying the stored answers in order — the bandit is a deterministic
function of its arguments and the observation sequence, and the live path observes exactly the stored float64
vectors, so the rebuilt bandit equals the one that was killed. A repeated submission of an answered query (a
double click, a retry) gets the stored response and observes nothing; different scores for an answered query
are refused (409). A query can be answered only with the token it was issued to. A reload shows the token's
unanswered query again rather than drawing a new one.

Privacy (see ``rewardopt.feedback.bandit``): the unit of the joint-DP analysis is a token — one person: a token
answers at most ``queries_per_token`` exploration queries (a further one is refused, 403), so a person contributes
at most ``show`` x ``queries_per_token`` ratings to the released statistics, and the sensitivity is scaled by exactly
that (``ratings_per_user`` of the bandit). Queries after the release are not capped: their ratings never enter the
estimate. Before the release the shown candidates depend only on (seed, t, K); afterwards on the released estimate
and this query's own context. The release noise's seed is secret: drawn from the OS on the store's first use and
kept in the store only (not in the recipe, not in a saved release), so a restart replays the same release and
nobody who reads the recipe can subtract the noise. Only sha256 of a token is stored; nothing else about a rater
is. Hand one token to one person: the guarantee is per token.

JSON API (token in ``Authorization: Bearer <token>`` or the cookie): ``GET /api/status``, ``GET /api/query``,
``POST /api/rate`` {"query_id", "scores": [...]}, ``GET /api/release`` (theta~ once released: the DP output,
public by design). HTML routes: ``/``, ``/login``, ``/logout``, ``/rate``. Errors: 400 (a bad score, an
unknown query), 403 (a bad token, another rater's query), 409 (an answered query with other scores), as
JSON under /api and as a page elsewhere.
"""

from __future__ import annotations

import base64
import io
import math
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from rewardopt.feedback.bandit import PrivateKernelBandit
from rewardopt.feedback.embed import embedder_spec
from rewardopt.feedback.kernels import RandomFourierFeatures
from rewardopt.feedback.store import RatingStore, StoredAnswer, StoredQuery
from rewardopt.generators.base import Generator
from rewardopt.run import derived_seed

WEB = Path(__file__).parent / "web"
COOKIE = "rater_token"
SCORES = range(1, 10)
#: the stream of the candidates' sampler noise (the prompt draw of query n uses stream n)
CANDIDATE_STREAM = 10**6


def score_reward(score: int) -> float:
    """A 1-9 rating -> the bandit's reward (s - 5) / 4 in [-1, 1] (``rewardopt.feedback.simulate.score_to_reward``)."""
    return (score - 5) / 4


class RatingError(Exception):
    """A request the server refuses, with its HTTP status and a message for the rater."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def parse_scores(raw: Any, n: int) -> list[int]:
    """``n`` whole scores 1-9 from a list of ints or strings; RatingError(400) naming the first bad one."""
    if not isinstance(raw, (list, tuple)):
        raise RatingError(400, f"scores must be a list of {n} whole numbers from 1 to 9")
    if len(raw) != n:
        raise RatingError(400, f"expected {n} scores (one per candidate shown), got {len(raw)}")
    out = []
    for i, s in enumerate(raw):
        value = None
        if isinstance(s, bool):
            value = None
        elif isinstance(s, int):
            value = s
        elif isinstance(s, float) and s.is_integer():
            value = int(s)
        elif isinstance(s, str) and s.strip().isdigit():
            value = int(s.strip())
        if value not in SCORES:
            shown = "nothing" if s in (None, "") else repr(s)
            raise RatingError(400, f"score for candidate {i + 1} must be a whole number from 1 to 9, got {shown}")
        out.append(value)
    return out


def png_base64(image: torch.Tensor, scale: int = 1) -> str:
    """(3, H, W) in [0, 1] -> a base64 PNG, upscaled ``scale`` times by nearest neighbour (pixels stay crisp)."""
    from PIL import Image

    x = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    if scale > 1:
        x = x.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    buf = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------ the session
class RatingSession(L.LightningModule):
    """What a query shows and how its answer teaches the bandit, and where it is served: the ``model`` of a
    ``rewardopt serve-ratings`` recipe (a LightningModule only so that recipes, class paths and config errors
    work as for every other command; nothing is trained). The recipe's ``data`` gives the prompts.

    Args:
        generator: proposes the candidates (any image ``Generator``: ``decode`` gives (N, 3, H, W) in [0, 1]).
        context_embedder, action_embedder: prompt -> (dc,), images -> (da,) (as in ``SimulatedRatings``).
        prompts: the contexts (default: the training prompts of the recipe's data module); query n gets one drawn
            uniformly by the generator of stream n of ``seed``.
        candidates: K, samples proposed per query; ``show`` of them are shown and rated.
        epsilon, delta, lam, explore_rounds: ``PrivateKernelBandit``'s (explore_rounds counts ratings).
        num_features, lengthscale, kernel: the random Fourier features over [context; action].
        seed: the bandit's exploration, the features', the prompt draws' and the sampler's seed (public; the
            release noise's seed is the store's secret one, ``RatingStore.noise_seed``).
        queries_per_token: exploration queries one token (one person) may answer; the bandit's sensitivity counts
            ``show`` x this many ratings per person (1: one query per person; more lets a person rate more, at a
            noise sigma that grows in proportion).
        display_scale: the images are shown this many times their size.
        store: the SQLite file (``rewardopt.feedback.store``). host, port (0: a free one), threads: waitress's.
    """

    def __init__(self, generator: Generator, context_embedder: nn.Module, action_embedder: nn.Module,
                 prompts: list[str] | None = None, candidates: int = 4, show: int = 2, epsilon: float = 1.0,
                 delta: float = 1e-5, lam: float = 1.0, explore_rounds: int = 256, num_features: int = 256,
                 lengthscale: float = 1.0, kernel: str = "rbf", seed: int = 0, queries_per_token: int = 1,
                 display_scale: int = 8, store: str = "runs/feedback/serve_ratings/ratings.sqlite",
                 host: str = "127.0.0.1", port: int = 8765, threads: int = 4) -> None:
        super().__init__()
        if not 1 <= show <= candidates:
            raise ValueError(f"show must be in [1, candidates={candidates}], got {show}")
        if queries_per_token < 1:
            raise ValueError(f"queries_per_token must be >= 1, got {queries_per_token}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0: a free one), got {port}")
        self.prompts = list(prompts) if prompts is not None else None
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts: need at least one prompt")
        self.generator, self.context_embedder, self.action_embedder = generator, context_embedder, action_embedder
        self.candidates, self.show, self.seed, self.display_scale = int(candidates), int(show), int(seed), display_scale
        self.store_path, self.host, self.port, self.threads = store, host, int(port), int(threads)
        self.bandit_args = {"epsilon": float(epsilon), "delta": float(delta), "reward_bound": 1.0, "lam": float(lam),
                            "explore_rounds": int(explore_rounds), "seed": int(seed),
                            "ratings_per_user": int(show) * int(queries_per_token)}
        self.queries_per_token = int(queries_per_token)
        self.feature_args = {"in_dim": int(context_embedder.dim + action_embedder.dim),
                             "num_features": int(num_features), "lengthscale": float(lengthscale), "kernel": kernel,
                             "seed": int(seed)}
        self.lock = threading.RLock()
        self.bandit = self.new_bandit()

    def new_bandit(self, noise_seed: int | None = None) -> PrivateKernelBandit:
        """A fresh bandit with this session's arguments (what a restart replays the answers into); its release
        noise from ``noise_seed`` (the store's secret one in ``replay``; None: a fresh secret one)."""
        a = self.feature_args
        features = RandomFourierFeatures(a["in_dim"], a["num_features"], a["lengthscale"], a["kernel"], seed=a["seed"])
        return PrivateKernelBandit(features, **self.bandit_args, noise_seed=noise_seed)

    def fingerprint(self) -> dict:
        """What replaying stored answers depends on (the store refuses a restart where it changed)."""
        return {"bandit": {k: ("inf" if v == math.inf else v) for k, v in self.bandit_args.items()},
                "features": self.feature_args, "show": self.show, "candidates": self.candidates,
                "context_embedder": embedder_spec(self.context_embedder),
                "action_embedder": embedder_spec(self.action_embedder)}

    # --- queries ------------------------------------------------------------------------------
    def prompt_for(self, n: int) -> str:
        if not self.prompts:
            raise RuntimeError("no prompts: pass prompts=[...] or a data module with training prompts")
        g = torch.Generator().manual_seed(derived_seed(self.seed, n))
        return self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))]

    @torch.no_grad()
    def propose(self, prompt: str, n: int) -> torch.Tensor:
        """Query n's K candidates for ``prompt``: (K, 3, H, W) in [0, 1]."""
        g = self.generator
        cond = g.encode_condition([prompt]).repeat_interleave(self.candidates)
        images = g.decode(g.sample(cond, generator=torch.Generator().manual_seed(
            derived_seed(self.seed, CANDIDATE_STREAM + n))))
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"the rating page shows images: {type(g).__name__}.decode must give (N, 3, H, W), got "
                            f"{getattr(images, 'shape', type(images).__name__)}")
        return images

    def issue_query(self, store: RatingStore, token_hash: str) -> StoredQuery:
        """The token's unanswered query, else a new one: K candidates proposed, ``show`` selected by the bandit,
        everything stored before it is returned."""
        with self.lock:
            pending = store.pending_query(token_hash)
            if pending is not None:
                return pending
            b = self.bandit
            if not b.released and store.num_queries(token_hash, issued_before=b.explore_rounds) >= \
                    self.queries_per_token:
                raise RatingError(403, f"this rater token has answered its {self.queries_per_token} "
                                       f"{'query' if self.queries_per_token == 1 else 'queries'} (the privacy "
                                       "guarantee counts each person's ratings); thank you")
            n = store.num_queries()
            prompt = self.prompt_for(n)
            images = self.propose(prompt, n)
            with torch.no_grad():
                context = self.context_embedder([prompt])[0].detach().to(torch.float64)
                actions = self.action_embedder(images).detach().to(torch.float64)
            shown = self.bandit.select(context, actions, k=self.show)
            pngs = [png_base64(images[i], self.display_scale) for i in shown]
            return store.add_query(token_hash, self.bandit.t, prompt, shown, context, actions, pngs)

    # --- answers ------------------------------------------------------------------------------
    def observe(self, answer: StoredAnswer) -> None:
        """Feed one stored answer to the bandit: one observe per shown candidate, in the order shown."""
        q = answer.query
        for position, score in enumerate(answer.scores):
            self.bandit.observe(q.context, q.actions[q.shown[position]], score_reward(score))

    def replay(self, store: RatingStore) -> int:
        """Rebuild the bandit from every stored answer, in order, with the store's secret noise seed; the number
        of answers replayed. Serving starts with it (``serve_main``; call it before ``create_app`` yourself)."""
        with self.lock:
            self.bandit = self.new_bandit(store.noise_seed())
            answers = store.answers()
            for a in answers:
                self.observe(a)
            return len(answers)

    def submit(self, store: RatingStore, token_hash: str, query_id: Any, raw_scores: Any) -> dict:
        """Validate and record an answer (idempotent: a repeat gets the stored response); the response."""
        if not isinstance(query_id, str) or not query_id:
            raise RatingError(400, "missing query_id")
        q = store.query(query_id)
        if q is None:
            raise RatingError(400, f"unknown query {query_id[:40]!r}: it was never handed out")
        if q.token_hash != token_hash:
            raise RatingError(403, "this query was handed out to another rater token")
        scores = parse_scores(raw_scores, len(q.shown))
        with self.lock:
            previous = store.answer(query_id)
            if previous is None:
                b = self.bandit
                t_after = b.t + len(scores)
                response = {"query_id": query_id, "scores": scores, "rewards": [score_reward(s) for s in scores],
                            "t": t_after, "released": b.released or t_after >= b.explore_rounds}
                answer, new = store.add_answer(query_id, scores, response)
                if new:  # committed: now the bandit may see it
                    self.observe(answer)
                previous = answer
            if previous.scores != scores:
                raise RatingError(409, f"query {query_id} was already answered with scores {previous.scores}; "
                                       "an answer cannot be changed")
            return previous.response

    def status(self, store: RatingStore) -> dict:
        b = self.bandit
        return {"t": b.t, "explore_rounds": b.explore_rounds, "released": b.released, "show": self.show,
                "candidates": self.candidates, "queries": store.num_queries(), "answers": store.num_answers(),
                "epsilon": "inf" if b.epsilon == math.inf else b.epsilon, "delta": b.delta,
                "privacy_unit": f"one rater token: up to {self.queries_per_token} exploration queries x {self.show} "
                                "ratings", "queries_per_token": self.queries_per_token,
                "epsilon_spent": b.accountant.epsilon(b.delta) if b.released else 0.0}


# ------------------------------------------------------------------------------------------ the web app
def query_json(q: StoredQuery) -> dict:
    return {"query_id": q.id, "prompt": q.prompt, "t_issued": q.t_issued, "shown": q.shown,
            "images": [f"data:image/png;base64,{png}" for png in q.images]}


def create_app(session: RatingSession, store: RatingStore):
    """The Flask app over one session and store (``session.replay(store)`` first: it binds the store's noise seed
    and its answers)."""
    from flask import Flask, jsonify, make_response, redirect, render_template, request

    if session.bandit.noise_seed != store.noise_seed():  # a bandit not rebuilt from this store: it could release
        raise RuntimeError("call session.replay(store) before create_app: the session's bandit must carry the store's "
                           "noise seed and answers (else a restart would release a second, unaccounted time)")

    app = Flask(__name__, template_folder=str(WEB / "templates"), static_folder=str(WEB / "static"))
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["rating_session"], app.extensions["rating_store"] = session, store

    def api() -> bool:
        return request.path.startswith("/api/")

    def presented_token() -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(COOKIE)

    def rater() -> str:
        token = presented_token()
        h = store.token_hash(token)
        if h is None:
            raise RatingError(403, "no rater token given: log in with the token you were handed" if not token
                              else "unknown rater token")
        return h

    @app.errorhandler(RatingError)
    def refused(e: RatingError):
        if api():
            return jsonify({"error": e.message, "status": e.status}), e.status
        return render_template("error.html", message=e.message, status=e.status), e.status

    @app.errorhandler(413)
    def too_large(e):
        return refused(RatingError(413, "request too large"))

    @app.get("/")
    def index():
        token = presented_token()
        if not token:
            return render_template("login.html", message=None)
        h = store.token_hash(token)
        if h is None:
            return render_template("login.html", message="That token is not recognised."), 403
        rated = request.args.get("rated")
        done = store.answer(rated) if rated else None
        if done is not None and done.query.token_hash != h:
            done = None
        q = session.issue_query(store, h)
        history = store.answers(token_hash=h, newest_first=True, limit=10)
        return render_template("rate.html", query=query_json(q), status=session.status(store), done=done,
                               history=history, scores=list(SCORES))

    @app.route("/login", methods=["GET", "POST"])
    def login():
        token = (request.form.get("token") if request.method == "POST" else request.args.get("token")) or ""
        token = token.strip()
        if store.token_hash(token) is None:
            return render_template("login.html", message="That token is not recognised." if token else None), (
                403 if token else 200)
        resp = make_response(redirect("/", code=303))
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", max_age=30 * 24 * 3600)
        return resp

    @app.post("/logout")
    def logout():
        resp = make_response(redirect("/", code=303))
        resp.delete_cookie(COOKIE)
        return resp

    @app.post("/rate")
    def rate_form():
        h = rater()
        q = store.query(request.form.get("query_id", ""))
        n = len(q.shown) if q is not None else 0
        response = session.submit(store, h, request.form.get("query_id", ""),
                                  [request.form.get(f"score_{i}") for i in range(n)])
        return redirect(f"/?rated={response['query_id']}", code=303)

    @app.get("/api/status")
    def api_status():
        rater()
        return jsonify(session.status(store))

    @app.get("/api/query")
    def api_query():
        return jsonify(query_json(session.issue_query(store, rater())))

    @app.post("/api/rate")
    def api_rate():
        h = rater()
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise RatingError(400, 'send JSON {"query_id": ..., "scores": [...]}')
        return jsonify(session.submit(store, h, body.get("query_id"), body.get("scores")))

    @app.get("/api/release")
    def api_release():
        rater()
        b = session.bandit
        if not b.released:
            raise RatingError(409, f"nothing released yet: {b.t} of {b.explore_rounds} ratings")
        return jsonify({"theta": b.theta.tolist(), "privacy": b.accountant.record(b.delta), "t": b.t})

    return app


# ------------------------------------------------------------------------------------------ the command
USAGE = """usage: rewardopt serve-ratings --config RECIPE [--store PATH] [--host HOST] [--port PORT] [--issue-token [N]]
                               [--model.init_args.KEY VALUE ...]

  --store PATH       the SQLite store (model.init_args.store)
  --host HOST        address to bind (model.init_args.host; default 127.0.0.1, loopback only)
  --port PORT        port to bind, 0 = a free one, printed (model.init_args.port)
  --issue-token [N]  issue N (default 1) rater tokens, print them one a line and exit (only their hashes are kept)
"""


def _own_args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser(prog="rewardopt serve-ratings", add_help=False)
    p.add_argument("--issue-token", type=int, nargs="?", const=1, default=0)
    p.add_argument("--store")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    overrides = [f"--model.init_args.{k}={getattr(args, k)}" for k in ("store", "host", "port")
                 if getattr(args, k) is not None]
    return args, [*rest, *overrides]


def _configure(cli_args: list[str], build: bool):
    """The recipe parsed (and its classes built when ``build``) by rewardopt's CLI; a config mistake is explained
    in at most three lines with exit code 2, as for ``rewardopt fit``."""
    from rewardopt.cli import CONFIG_ERROR_EXIT_CODE, RewardOptCLI, explain_config_error, is_config_error

    class ParseOnly(RewardOptCLI):
        def instantiate_classes(self):
            pass

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args beside a command line
    try:
        cli = (RewardOptCLI if build else ParseOnly)(args=cli_args, parser_kwargs={"exit_on_error": False}, run=False)
    except Exception as e:
        if not is_config_error(e):
            raise
        sys.stderr.write("".join(f"{line}\n" for line in explain_config_error(e, False)))
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    finally:
        sys.argv = argv
    return cli


def _lock_store(path: str):
    """An exclusive lock beside the store, held while the process lives: two servers replaying and appending to
    one store would each hold a bandit that misses the other's answers."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    f = open(f"{path}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SystemExit(f"serve-ratings: another process serves {path} (its lock {path}.lock is held)")
    return f


def serve_main(argv: list[str]) -> None:
    """``rewardopt serve-ratings``: issue tokens, or rebuild the bandit from the store and serve until killed."""
    args, cli_args = _own_args(argv)
    if args.help or not cli_args:
        sys.stdout.write(USAGE)
        return
    if args.issue_token:
        cfg = _configure(cli_args, build=False).config
        if cfg["model"]["class_path"].rsplit(".", 1)[-1] != RatingSession.__name__:
            sys.exit(f"serve-ratings: the recipe's model is {cfg['model']['class_path']}, not a RatingSession")
        store = RatingStore(cfg["model"]["init_args"]["store"])
        for token in store.issue_tokens(args.issue_token):
            print(token)
        store.close()
        return
    cli = _configure(cli_args, build=True)
    session = cli.model
    if not isinstance(session, RatingSession):
        sys.exit(f"serve-ratings: the recipe's model is {type(session).__name__}, not a RatingSession")
    if session.prompts is None:
        prompts = getattr(cli.datamodule, "train_prompts", None)
        if not prompts:
            sys.exit("serve-ratings: no prompts: give model.init_args.prompts or a data module with train_prompts")
        session.prompts = list(prompts)
    store = RatingStore(session.store_path)
    lock = _lock_store(session.store_path)
    store.check_fingerprint(session.fingerprint())
    replayed = session.replay(store)
    if store.num_tokens() == 0:
        token = store.issue_tokens(1)[0]
        print(f"no rater tokens in {session.store_path}; issued one (shown only now): {token}", flush=True)
    from waitress import create_server

    server = create_server(create_app(session, store), host=session.host, port=session.port, threads=session.threads)
    status = session.status(store)
    print(f"serving ratings on http://{session.host}:{server.effective_port}/ (store {session.store_path}: "
          f"{replayed} answers replayed, t={status['t']}, released={status['released']})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        store.close()
        if lock is not None:
            lock.close()


# ------------------------------------------------------------------------------------------ a child process
class ServerProcess:
    """``rewardopt serve-ratings ARGS`` in a child process (tests, the screenshot script): ``start`` waits for the
    URL it prints (and the token it issues when the store has none); ``kill`` ends it with SIGKILL, as a crash would.

    Args:
        args: the command's arguments (``--config``, ``--store``, ``--port 0``, overrides).
        cwd: its working directory (recipes name files relative to the repository root).
        timeout: seconds to wait for the URL.
    """

    def __init__(self, args: list[str], cwd: str | Path | None = None, timeout: float = 180.0) -> None:
        self.args, self.cwd, self.timeout = list(args), cwd, timeout
        self.proc = None
        self.url: str | None = None
        self.token: str | None = None
        self.output: list[str] = []

    def start(self) -> ServerProcess:
        import os
        import queue
        import re
        import subprocess

        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "rewardopt.cli", "serve-ratings", *self.args], cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue = queue.Queue()

        def drain():  # keep reading, so the child never blocks on a full pipe
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        import time

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError("serve-ratings exited before serving:\n" + "".join(self.output)[-4000:])
            if m := re.search(r"issued one \(shown only now\): (\S+)", line):
                self.token = m[1]
            if m := re.search(r"serving ratings on (http://\S+/)", line):
                self.url = m[1]
                return self
        self.kill()
        raise TimeoutError(f"serve-ratings printed no URL within {self.timeout} s:\n" + "".join(self.output)[-4000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
