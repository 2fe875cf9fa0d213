"""A local OpenAI-compatible judge server for tests, benchmarks and trying recipes offline.

It answers ``POST /v1/chat/completions`` like vLLM does (text plus ``logprobs.content`` with
``top_logprobs``). The default scorer is deterministic: it decodes the image and rates how blue it
is on the 1-9 scale (a stand-in for an LVLM's judgement), and spreads the answer token's
probability over neighbouring integers. Faults can be injected per request index:

    with JudgeServer(latency_s=0.2, faults={0: "500", 1: "malformed", 2: "drop", 3: "slow"}) as srv:
        judge = OpenAIJudge(base_url=srv.base_url, model="test")

``faults`` maps request index -> "500" | "malformed" | "drop" (close the connection without an
answer) | "slow" (sleep ``slow_s``) | "nologprobs" | "stray_digits" (an answer with digits but no
"Score: N", without log-probs) | "malformed_logprobs" (the same malformed answer with log-probs for
its tokens, the stray digit's spread over neighbours); or pass ``fault_fn(index) -> kind | None``.
``requests`` counts the requests answered (or failed) and ``connections`` the TCP connections
accepted, so a test can tell a client that keeps its connections alive from one that reconnects.

A judge that reads the prompt as well as the image is a ``prompt_scorer(png, text, lo, hi)``: it gets
the user message's text (the filled-in template; the scorer finds the prompt in it) and returns a
score, or (score, reasoning). A ``ValueError`` from it (no prompt it can read) is answered HTTP 400.
``answer_style`` is the answer's shape: "score" ("...\nScore: N", the default template's) or
"free2guide" ("Reasoning: <the scorer's reasoning>\nAnswer: N", Free²Guide's prompt's). Either way the
log-prob tokens spell the text exactly and the answer token's top log-probs spread over the integers
around the score (``completion_for_score``). ``domains.video.judge`` serves its trained grid judge so.

    python -m rewardopt.testing.judge_server --port 8000 --latency 0.2
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def blueness_score(png: bytes, lo: int = 1, hi: int = 9) -> float:
    """Continuous score in [lo, hi]: how much blue dominates red and green, averaged over pixels."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0
    b = float((a[..., 2] - (a[..., 0] + a[..., 1]) / 2).mean())  # in [-1, 1]
    return lo + (hi - lo) * (b + 1) / 2


ANSWER_STYLES = ("score", "free2guide")

_WORD = re.compile(r" ?[A-Za-z]+|[0-9]|\s|[^\sA-Za-z0-9]")


def word_tokens(text: str) -> list[str]:
    """``text`` cut into word-level tokens that spell it exactly, as a BPE tokenizer would: a word with
    its leading space (" red"), each digit, each other character (".", "\n", a lone space)."""
    tokens = _WORD.findall(text)
    if "".join(tokens) != text:
        raise AssertionError(f"tokens do not spell {text!r}")
    return tokens


class JudgeServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0,
                 faults: dict[int, str] | None = None, fault_fn: Callable[[int], str | None] | None = None,
                 slow_s: float = 5.0, scorer: Callable[[bytes, int, int], float] = blueness_score,
                 score_min: int = 1, score_max: int = 9,
                 prompt_scorer: Callable[[bytes, str, int, int], float | tuple[float, str]] | None = None,
                 answer_style: str = "score") -> None:
        if answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, got {answer_style!r}")
        self.latency_s, self.faults, self.fault_fn, self.slow_s = latency_s, dict(faults or {}), fault_fn, slow_s
        self.scorer, self.score_min, self.score_max = scorer, score_min, score_max
        self.prompt_scorer, self.answer_style = prompt_scorer, answer_style
        self.requests = self.connections = 0
        self.auth_headers: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as asyncio servers (uvicorn: vLLM, SGLang) set it: the headers and the body go
            # out as two writes, and on a kept-alive connection Nagle would hold the body for the
            # client's delayed ACK (~40 ms a request)
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def setup(self):  # once per TCP connection (HTTP/1.1 keep-alive serves many requests on it)
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_POST(self):  # noqa: N802
                with server.lock:
                    idx = server.requests
                    server.requests += 1
                    server.auth_headers.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                kind = server.faults.get(idx) or (server.fault_fn(idx) if server.fault_fn else None)
                time.sleep(server.latency_s)
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if kind == "slow":
                    time.sleep(server.slow_s)
                if kind == "500":
                    return self._send(500, {"error": {"message": "internal error (injected)"}})
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if kind == "malformed":
                    return self._send(200, server.completion("I cannot rate this image.", None))
                if kind in ("stray_digits", "malformed_logprobs"):
                    return self._send(200, server.stray_digit_completion(kind == "malformed_logprobs"))
                png = server.image_of(body)
                reasoning = None
                if server.prompt_scorer is not None:
                    try:
                        s = server.prompt_scorer(png, server.text_of(body), server.score_min, server.score_max)
                    except ValueError as e:
                        return self._send(400, {"error": {"message": str(e)}})
                    if isinstance(s, tuple):
                        s, reasoning = s
                else:
                    s = server.scorer(png, server.score_min, server.score_max)
                want_lp = body.get("logprobs") and kind != "nologprobs"
                top = int(body.get("top_logprobs") or 5) if want_lp else 0
                self._send(200, server.completion_for_score(s, top, reasoning))

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default listen backlog (5) drops connections under concurrency
            daemon_threads = True

        self.httpd = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @staticmethod
    def image_of(body: dict) -> bytes:
        for part in body["messages"][-1]["content"]:
            if part.get("type") == "image_url":
                return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        raise ValueError("no image in request")

    @staticmethod
    def text_of(body: dict) -> str:
        """The text of the last (user) message: its text parts joined, or its content if a string."""
        content = body["messages"][-1]["content"]
        if isinstance(content, str):
            return content
        return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")

    def completion(self, text: str, logprobs: list | None) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return {"id": "cmpl-local", "object": "chat.completion", "model": "local-judge", "choices": [choice]}

    STRAY_TOKENS = ("I", " cannot", " rate", " ", "2", " images", ";", " ", "3", " objects", " are", " unclear", ".")

    def stray_digit_completion(self, with_logprobs: bool) -> dict:
        """A malformed answer whose only digits (2, 3) are not a score: a judge that reads "any
        integer in range" would score it 2 or 3."""
        lp = None
        if with_logprobs:
            lp = []
            for t in self.STRAY_TOKENS:
                alts = [{"token": t, "logprob": math.log(0.7)}]
                if t.isdigit():
                    alts.append({"token": str(int(t) + 1), "logprob": math.log(0.3)})
                lp.append({"token": t, "logprob": alts[0]["logprob"], "top_logprobs": alts})
        return self.completion("".join(self.STRAY_TOKENS), lp)

    def completion_for_score(self, s: float, top: int, reasoning: str | None = None) -> dict:
        """An answer ending in "Score: round(s)" ("score" style) or "Reasoning: ...\nAnswer: round(s)"
        ("free2guide"); the answer token's top log-probs are a softmax over integers around s, so their
        expectation recovers s closely (and the top-1 token is round(s))."""
        k = int(min(self.score_max, max(self.score_min, round(s))))
        if self.answer_style == "free2guide":
            reasoning = " ".join((reasoning or "The video shows the requested content.").split())
            prefix = f"Reasoning: {reasoning}\nAnswer: "
            words = word_tokens(prefix)
        else:
            prefix = "The image shows the requested content.\nScore: "
            words = ["The", " image", " shows", " the", " requested", " content", ".", "\n", "Score", ":", " "]
        text = prefix + str(k)
        if not top:
            return self.completion(text, None)
        ks = list(range(self.score_min, self.score_max + 1))
        w = [math.exp(-((j - s) ** 2) / 0.5) for j in ks]
        z = sum(w)
        alts = sorted(({"token": str(j), "logprob": math.log(max(wj / z, 1e-30))} for j, wj in zip(ks, w)),
                      key=lambda a: -a["logprob"])[:top]
        # the tokens spell the text exactly, as real servers' do (the client checks that before trusting them)
        lp = [{"token": t, "logprob": 0.0, "top_logprobs": []} for t in words]
        lp.append({"token": str(k), "logprob": next((a["logprob"] for a in alts if a["token"] == str(k)), -1.0),
                   "top_logprobs": alts})
        return self.completion(text, lp)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_until_interrupted() -> None:
    """Block until Ctrl-C (what a served judge's command line does while its server thread answers)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    a = p.parse_args()
    with JudgeServer(a.host, a.port, latency_s=a.latency) as srv:
        print(f"judge server on {srv.base_url} (Ctrl-C to stop)")
        wait_until_interrupted()


if __name__ == "__main__":
    main()
