"""The rating page's durable state: rater tokens, the queries handed out and their answers, in SQLite.

One database file (stdlib ``sqlite3``, write-ahead log, ``synchronous=FULL``: a committed answer survives a
killed process and a power cut). Every change is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so the
server commits an answer *before* it feeds it to the bandit and answers the rater; a crash in between loses
nothing, because on start the bandit is rebuilt by replaying every stored answer in order (``answers()``).

Tables:

    meta      key/value: the schema version, the session's fingerprint (the bandit's arguments and
              embedders), so a restart with a different bandit configuration is refused instead of
              replaying old ratings into a different model, and the release's secret noise seed (drawn from the
              OS on first use; a restart replays with it; it leaves the server nowhere else — the file holds
              the raw ratings anyway and must be kept as private as they are)
    tokens    sha256 (hex) of each rater token — the token itself is never stored
    queries   one row per query handed out: a random id, the token hash it was issued to, the bandit's t when
              it was issued, the prompt, the candidate indices shown, the context (dc,) and all K candidates'
              action embeddings (K, da) as float64 bytes, and the shown candidates' PNGs
    answers   at most one per query (UNIQUE): the 1-9 scores of the shown candidates, in the order shown, and
              the JSON response the rater got (a repeated submission gets it again)

No rater identity beyond the token hash is kept: no names, addresses, user agents or timestamps. Answers are
ordered by their insertion sequence (``answers.seq``), which is the order the bandit observed them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY CHECK (length(hash) = 64));
CREATE TABLE IF NOT EXISTS queries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL REFERENCES tokens(hash),
    t_issued INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    shown TEXT NOT NULL,
    context BLOB NOT NULL,
    actions BLOB NOT NULL,
    num_candidates INTEGER NOT NULL,
    images TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS queries_token ON queries(token_hash);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    query_id TEXT NOT NULL UNIQUE REFERENCES queries(id),
    scores TEXT NOT NULL,
    response TEXT NOT NULL
);
"""


def hash_token(token: str) -> str:
    """sha256 hex of a rater token (what the store keeps)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh rater token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def to_blob(x: torch.Tensor) -> bytes:
    """A tensor's values as little-endian float64 bytes (lossless for float32 embeddings)."""
    return x.detach().to(torch.float64).contiguous().cpu().numpy().astype("<f8").tobytes()


def from_blob(blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.float64).reshape(shape).clone()


@dataclass(frozen=True)
class StoredQuery:
    """A query as handed out: ``shown`` are indices into the K candidates, ``images`` the shown ones' PNGs
    (base64), ``context`` (dc,) and ``actions`` (K, da) float64."""

    seq: int
    id: str
    token_hash: str
    t_issued: int
    prompt: str
    shown: list[int]
    context: torch.Tensor
    actions: torch.Tensor
    images: list[str]


@dataclass(frozen=True)
class StoredAnswer:
    seq: int
    query: StoredQuery
    scores: list[int]
    response: dict


class ConfigMismatch(RuntimeError):
    """The store was written by a session with another bandit configuration."""


class RatingStore:
    """The SQLite store (module docstring). Thread-safe: one connection guarded by a lock (the server's
    threads share it); every write is one transaction.

    Args:
        path: the database file (its folder is created); ":memory:" for a throwaway store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"could not put {self.path} in WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous = FULL")
        with self.transaction() as db:
            for statement in SCHEMA.split(";"):  # executescript would commit the open transaction
                if statement.strip():
                    db.execute(statement)
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif version[0] != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has rating-store schema {version[0]}; this code reads "
                                   f"{SCHEMA_VERSION}")

    # --- plumbing -------------------------------------------------------------------------------
    class _Transaction:
        def __init__(self, store: RatingStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def transaction(self) -> RatingStore._Transaction:
        """``with store.transaction() as db:`` — one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""
        return RatingStore._Transaction(self)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- the session's fingerprint ----------------------------------------------------------------
    def check_fingerprint(self, fingerprint: dict) -> None:
        """Record ``fingerprint`` (JSON-able) on first use; afterwards raise ``ConfigMismatch`` if it differs
        while answers exist (replaying them into another bandit would be a different model)."""
        value = json.dumps(fingerprint, sort_keys=True)
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            if row is not None and row[0] != value:
                n = db.execute("SELECT count(*) FROM answers").fetchone()[0]
                if n:
                    old, new = json.loads(row[0]), fingerprint
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise ConfigMismatch(
                        f"{self.path} holds {n} answers collected with another bandit configuration (differs in: "
                        f"{', '.join(diff)}); use the original config or a new store")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (value,))

    def noise_seed(self) -> int:
        """The release's secret noise seed: drawn once (``secret_seed``, the OS's CSPRNG) and stored, then the
        stored one on every later call and restart."""
        from rewardopt.feedback.bandit import secret_seed

        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'noise_seed'").fetchone()
            if row is not None:
                return int(row[0])
            seed = secret_seed()
            db.execute("INSERT INTO meta VALUES ('noise_seed', ?)", (str(seed),))
            return seed

    # --- tokens ---------------------------------------------------------------------------------
    def issue_tokens(self, n: int = 1) -> list[str]:
        """n new rater tokens; only their hashes are stored. The tokens are returned once, never again."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        tokens = [new_token() for _ in range(n)]
        with self.transaction() as db:
            db.executemany("INSERT INTO tokens VALUES (?)", [(hash_token(t),) for t in tokens])
        return tokens

    def num_tokens(self) -> int:
        return self._read("SELECT count(*) FROM tokens")[0][0]

    def token_hash(self, token: str | None) -> str | None:
        """The stored hash of a valid token, else None."""
        if not token or len(token) > 256:
            return None
        h = hash_token(token)
        return h if self._read("SELECT 1 FROM tokens WHERE hash = ?", (h,)) else None

    # --- queries --------------------------------------------------------------------------------
    def num_queries(self, token_hash: str | None = None, issued_before: int | None = None) -> int:
        """Queries handed out (to ``token_hash`` only, if given; issued at bandit t < ``issued_before``, if given)."""
        sql, args = "SELECT count(*) FROM queries WHERE 1 = 1", []
        if token_hash is not None:
            sql, args = sql + " AND token_hash = ?", [*args, token_hash]
        if issued_before is not None:
            sql, args = sql + " AND t_issued < ?", [*args, int(issued_before)]
        return self._read(sql, tuple(args))[0][0]

    def add_query(self, token_hash: str, t_issued: int, prompt: str, shown: list[int], context: torch.Tensor,
                  actions: torch.Tensor, images: list[str]) -> StoredQuery:
        """Record a query handed out to ``token_hash``; returns it as stored (vectors read back as float64)."""
        qid = secrets.token_urlsafe(12)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO queries (id, token_hash, t_issued, prompt, shown, context, actions, num_candidates, "
                "images) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (qid, token_hash, int(t_issued), prompt, json.dumps([int(i) for i in shown]), to_blob(context),
                 to_blob(actions), int(actions.shape[0]), json.dumps(images)))
        return self.query(qid)

    @staticmethod
    def _query(row: sqlite3.Row) -> StoredQuery:
        K = row["num_candidates"]
        actions = torch.frombuffer(bytearray(row["actions"]), dtype=torch.float64).clone()
        return StoredQuery(seq=row["seq"], id=row["id"], token_hash=row["token_hash"], t_issued=row["t_issued"],
                           prompt=row["prompt"], shown=json.loads(row["shown"]),
                           context=from_blob(row["context"], (-1,)), actions=actions.reshape(K, -1),
                           images=json.loads(row["images"]))

    def query(self, query_id: str) -> StoredQuery | None:
        rows = self._read("SELECT * FROM queries WHERE id = ?", (query_id,))
        return self._query(rows[0]) if rows else None

    def pending_query(self, token_hash: str) -> StoredQuery | None:
        """The oldest query issued to this token and not answered yet (a reload shows it again)."""
        rows = self._read("SELECT q.* FROM queries q LEFT JOIN answers a ON a.query_id = q.id "
                          "WHERE q.token_hash = ? AND a.query_id IS NULL ORDER BY q.seq LIMIT 1", (token_hash,))
        return self._query(rows[0]) if rows else None

    # --- answers --------------------------------------------------------------------------------
    def add_answer(self, query_id: str, scores: list[int], response: dict) -> tuple[StoredAnswer, bool]:
        """Store the answer to ``query_id`` (which must exist) unless it is answered already. Returns the stored
        answer and whether it is new (False: an earlier answer, left as it was)."""
        with self.transaction() as db:
            try:
                db.execute("INSERT INTO answers (query_id, scores, response) VALUES (?, ?, ?)",
                           (query_id, json.dumps([int(s) for s in scores]), json.dumps(response)))
                new = True
            except sqlite3.IntegrityError as e:
                if db.execute("SELECT 1 FROM queries WHERE id = ?", (query_id,)).fetchone() is None:
                    raise KeyError(f"unknown query {query_id!r}") from e
                new = False
        return self.answer(query_id), new

    def _answer(self, row: sqlite3.Row) -> StoredAnswer:
        return StoredAnswer(seq=row["aseq"], query=self._query(row), scores=json.loads(row["scores"]),
                            response=json.loads(row["response"]))

    _ANSWER_SQL = "SELECT q.*, a.seq AS aseq, a.scores, a.response FROM answers a JOIN queries q ON q.id = a.query_id "

    def answer(self, query_id: str) -> StoredAnswer | None:
        rows = self._read(self._ANSWER_SQL + "WHERE a.query_id = ?", (query_id,))
        return self._answer(rows[0]) if rows else None

    def answers(self, token_hash: str | None = None, newest_first: bool = False,
                limit: int | None = None) -> list[StoredAnswer]:
        """Stored answers in the order they were observed (or newest first), optionally one token's only."""
        sql, args = self._ANSWER_SQL, ()
        if token_hash is not None:
            sql, args = sql + "WHERE q.token_hash = ? ", (token_hash,)
        sql += "ORDER BY a.seq" + (" DESC" if newest_first else "")
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + (int(limit),)
        return [self._answer(r) for r in self._read(sql, args)]

    def num_answers(self) -> int:
        return self._read("SELECT count(*) FROM answers")[0][0]
