"""Black-box judges: a vision-language model scores each sample against its prompt.

``OpenAIJudge`` sends the image (or, for a video, a labelled 2x2 grid of key frames) and a prompt
template to an OpenAI-compatible ``/chat/completions`` endpoint — what vLLM, SGLang and hosted APIs
serve — over one pooled ``httpx2`` client per judge (keep-alive connections, at most one per
request in flight; not pickled, and a forked process opens its own) — and turns the answer into a
score in [score_min, score_max]:

The answer is the integer right after the last answer marker (``score_marker``: exactly the
marker(s) configured, default the "Score:" that the default template asks for; a template asking
for Free²Guide's "Answer: N" sets ``score_marker: "Answer:"``), matched as a whole word:

* when the server returns log-probabilities (``logprobs``/``top_logprobs``), the answer token's
  distribution gives the score: its expectation over the in-range integers (``logprob_score:
  expectation``, the default of this generic judge, so near-ties still rank candidates) or its
  most likely in-range integer (``top1``, what Free²Guide's public code does; its recipes use it);
* otherwise the integer in the text.

An answer without a marker followed by an integer in range (stray digits, "Score: 10" on a 1-9
scale, a decimal, "1,000", "1e3") is an error: it is retried and, if it persists, handled by the failure policy
and counted. The API key is read from the environment variable ``api_key_env`` at
call time; it is never stored on the object, logged or put in an error message.

``TransformersJudge`` is the in-process backend: a ``transformers`` image-text-to-text model and its
processor (local folder or hub id) score the same template by the next-token distribution over the
score digits after the prompt — one forward pass per sample, no generation.

Concurrency, per-call timeouts, retries with backoff, the circuit breaker, the content cache and the
failure policy come from ``BlackBoxReward``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import httpx2
import numpy as np
import torch

from rewardopt.rewards.blackbox import BlackBoxReward

DEFAULT_TEMPLATE = (
    "You are judging a generated image for the prompt: \"{prompt}\".\n"
    "Think step by step about how well the image matches the prompt (objects, attributes, counts) and "
    "its visual quality. End your answer with a final line of the form \"Score: N\", where N is an "
    "integer from {min} (worst) to {max} (best)."
)


FREE2GUIDE_VIDEO_TEMPLATE = (
    "The image is a 2x2 grid of four key frames of one video, in time order: top-left is frame 1, top-right "
    "frame 2, bottom-left frame 3 and bottom-right frame 4. Looking at all four frames together, rate how well "
    "the video matches the text \"{prompt}\": the objects, their colour and number, and how they move from "
    "frame to frame. First write \"Reasoning:\" followed by your reasoning, then a last line \"Answer: N\" "
    "with N one integer from {min} (does not match) to {max} (matches perfectly)."
)
"""A video judge prompt in the shape of Free²Guide's (Kim et al., 2024; public code kjm981995/free2guide_code):
the four key frames of ``to_png``'s grid are numbered 1-4 in reading order, the judge reasons first
("Reasoning: ...") and ends with "Answer: N" on 1-9 (use ``score_marker: "Answer:"``; the public code
reads the top-1 log-prob answer token: ``logprob_score: top1``). Our wording."""


def to_png(sample: Any, frames: int = 4, min_tile: int = 96) -> bytes:
    """(3, H, W) image in [0, 1] -> PNG bytes; (F, 3, H, W) video -> the PNG of ``key_frame_grid``."""
    buf = io.BytesIO()
    to_image(sample, frames, min_tile).save(buf, format="PNG")
    return buf.getvalue()


def to_image(sample: Any, frames: int = 4, min_tile: int = 96):
    """What ``to_png`` encodes (PNG is lossless: the same pixels): a PIL image, or ``key_frame_grid``."""
    t = sample.detach().cpu() if isinstance(sample, torch.Tensor) else torch.as_tensor(np.asarray(sample))
    t = t.float()
    if t.ndim == 4:
        return key_frame_grid(t, frames, min_tile)
    if t.ndim == 3:
        return to_pil(t)
    raise ValueError(f"judges score images (3, H, W) or videos (F, 3, H, W); got shape {tuple(t.shape)}")


def key_frame_grid(video: torch.Tensor, frames: int = 4, min_tile: int = 96):
    """(F, 3, H, W) video in [0, 1] -> a labelled grid of ``frames`` key frames (a PIL image).

    The key frames are ``rewardopt.media.key_frames(F, frames)`` (Free²Guide's public code: frames 0, 5, 10,
    15 of 16). Four make a 2x2 grid, any other number one row. Tile k in reading order (top-left,
    top-right, bottom-left, bottom-right) shows key frame k and is labelled "Frame k+1": the grid
    position, numbered 1-4 as Free²Guide's prompt numbers them ("the top left is the first frame, ...,
    the bottom right is the fourth frame"), not the index of the frame in the clip. Small frames are
    first upscaled by an integer factor (nearest neighbour: each pixel becomes an s x s block) so that
    each tile is at least ``min_tile`` px on its short side; then the label is drawn in the tile's
    top-left corner (yellow, dark outline). An (F, 3, 16, 16) clip gives a 192x192 grid of 96x96 tiles:
    a reader that knows the geometry gets each frame back by splitting the grid and area-averaging each
    tile to 16x16 (only the label's corner differs)."""
    from PIL import Image

    from rewardopt.media import key_frames

    if min_tile < 1:
        raise ValueError(f"min_tile must be >= 1, got {min_tile}")
    scale = max(1, -(-min_tile // min(video.shape[-2:])))
    tiles = []
    for fi in key_frames(video.shape[0], frames):
        tile = to_pil(video[fi]).convert("RGB")
        if scale > 1:  # nearest neighbour by an integer factor: each pixel becomes a scale x scale block
            tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
        tiles.append(tile)
    w, h = tiles[0].size
    cols = 2 if len(tiles) == 4 else len(tiles)
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, tile in enumerate(tiles):
        label = _label(f"Frame {k + 1}", max(8, min(w, h) // 8))
        tile.paste(label, (2, 1), label)
        grid.paste(tile, ((k % cols) * w, (k // cols) * h))
    return grid


@functools.lru_cache(maxsize=64)
def _label(text: str, size: int):
    """``text`` in yellow with a dark outline on a transparent background (RGBA), drawn once per size."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGBA", (1, 1))).textbbox((0, 0), text, font=font,
                                                                                    stroke_width=1)
    img = Image.new("RGBA", (right + 1, bottom + 1), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), text, fill=(255, 255, 0, 255), font=font, stroke_width=1,
                             stroke_fill=(0, 0, 0, 255))
    return img


def to_pil(img: torch.Tensor):
    from PIL import Image

    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W) in [0, 1], got {tuple(img.shape)}")
    a = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)


SCORE_MARKERS = ("Score:",)
"""The answer marker of ``DEFAULT_TEMPLATE``; a template asking for "Answer: N" (Free²Guide's) configures
``score_marker: "Answer:"``."""

LOGPROB_SCORES = ("expectation", "top1")


def answer_markers(score_marker: str | Sequence[str]) -> tuple[str, ...]:
    """The markers a judge accepts: exactly its ``score_marker`` (one text, or a list of them)."""
    items = [score_marker] if isinstance(score_marker, str) else score_marker
    if (not isinstance(items, (list, tuple)) or not items
            or any(not isinstance(m, str) or not m.strip() for m in items)):
        raise ValueError(f"score_marker must be the text before the answer, e.g. 'Score:' (or a list of such "
                         f"texts); got {score_marker!r}")
    return tuple(dict.fromkeys(m.strip() for m in items))


@functools.lru_cache(maxsize=64)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    """Any of ``markers`` as a whole word, tolerating markdown emphasis and spaces before their
    punctuation ("**Score**: 7", "Score : 7"), followed by the answer: optional spaces, emphasis or
    an opening bracket, then the number (``num``) and whatever continues it (``more``: ",000",
    ".5", "e3", which make it not an integer).

    Our reading: matched case-insensitively (judges write "SCORE:" or "score:" as often as the
    template's "Score:"); a letter, digit or hyphen right before the marker makes it part of another
    word ("Subscore:", "Sub-score:"), so it is not the marker."""
    alts = []
    for m in markers:
        if not m or not m.strip():
            raise ValueError(f"score markers must be non-empty text, got {m!r}")
        m = m.strip()
        body = "".join(re.escape(c) if c.isalnum() or c.isspace() else r"[\s*_]*" + re.escape(c) for c in m)
        if m[0].isalnum():
            body = r"(?<![^\W_])(?<!-)" + body
        if m[-1].isalnum():
            body += r"(?![^\W_])"
        alts.append(body)
    return re.compile(r"(?:" + "|".join(alts) + r")[\s*_\[(\"']*(?P<num>[0-9]+)?"
                      r"(?P<more>(?:[.,][0-9]|[eE][+-]?[0-9])[0-9.,eE+-]*)?", re.IGNORECASE)


def _answer_span(text: str, markers: Sequence[str], lo: int, hi: int) -> tuple[int, int, int]:
    """(start, end, value) of the integer right after the LAST answer marker in ``text``.

    Raises ValueError when there is no marker, nothing numeric right after it, a number that goes on
    past the integer (a decimal "7.5", "1,000", "1e3": never read as 7 or 1), or an integer outside
    [lo, hi] — the judge did not answer as asked, so the call is retried / counted."""
    hits = list(_marker_pattern(tuple(markers)).finditer(text))
    if not hits:
        raise ValueError(f"judge answer has no score: no {' / '.join(map(repr, markers))} in {text[-200:]!r}")
    m = hits[-1]
    num = m.group("num")
    if num is None:
        raise ValueError(f"judge answer has no score after its last {m.group(0).strip()!r}: {text[-200:]!r}")
    if m.group("more"):
        raise ValueError(f"judge score {num + m.group('more')} is not an integer in [{lo}, {hi}]: {text[-200:]!r}")
    value = int(num)
    if not lo <= value <= hi:
        raise ValueError(f"judge score {value} is outside [{lo}, {hi}]: {text[-200:]!r}")
    return m.start("num"), m.end("num"), value


_BPE_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})
"""Byte-level BPE (GPT-2: Ġ space, Ċ newline, ĉ tab) and SentencePiece (▁ space) word markers, as
servers that return raw vocabulary tokens spell them."""


def _token_texts(logprobs: list[dict], text: str) -> list[str] | None:
    """The generated tokens as pieces of ``text``: as returned, else with their BPE markers
    (``_BPE_MARKERS``) replaced by the whitespace they stand for; None when neither spells ``text``
    (up to leading / trailing whitespace): then the log-probs cannot be tied to the answer."""
    raw = [str(e.get("token", "")) for e in logprobs]
    for tokens in (raw, [t.translate(_BPE_MARKERS) for t in raw]):
        if "".join(tokens).strip() == text.strip():
            return tokens
    return None


def _digits(tok: str) -> str | None:
    s = tok.translate(_BPE_MARKERS).strip()
    return s if s.isascii() and s.isdigit() else None


def _begins_longer_answer(s: str, lo: int, hi: int) -> bool:
    """Whether the digits ``s`` can be the first token of a longer integer in [lo, hi] ("1" of "10"
    on a 1-10 scale; "1" and "2" on 10-20)."""
    k = int(s)
    if k == 0:  # answers are not written with leading zeros
        return False
    return any(k * 10 ** d <= hi and (k + 1) * 10 ** d - 1 >= lo for d in range(1, len(str(hi)) - len(s) + 1))


def parse_score(text: str, logprobs: list[dict] | None, lo: int, hi: int, markers: Sequence[str] = SCORE_MARKERS,
                logprob_score: str = "expectation") -> float:
    """The judge's score from an answer ``text`` and, if given, the per-token ``logprobs`` content
    (OpenAI format: [{"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]}, ...]).

    The answer is the integer right after the LAST of ``markers`` (exactly what the template asks
    for, e.g. "Score: N"; Free²Guide's template asks for "Answer: N"), matched as a whole word and
    case-insensitively (``_marker_pattern``); anything else raises ValueError: no marker (stray
    digits such as "I cannot rate 2 images." are never a score), a number that continues past the
    integer ("7.5", "1,000", "1e3"), or an integer outside [lo, hi] ("Score: 10" on a 1-9 scale is
    an invalid answer, not a 9 and not an earlier "3").

    With log-probs the same rule is applied to the generated tokens (raw BPE tokens such as "Ġ7"
    are read as " 7"), and the answer token is the one holding that integer; ``logprob_score`` then
    gives:

    * ``"expectation"``: sum_k k·p(k) over the in-range integers among its top log-probs,
      renormalised (near-ties still rank candidates; G-Eval's probability-weighted score);
    * ``"top1"``: the most likely in-range integer among them (Free²Guide's public code reads the
      top-1 log-prob token of the answer).

    Our reading — where the answer token has no distribution over the answers, the score is the
    integer in the text:

    * tokens that do not spell ``text`` (byte tokens, ids, a server that post-processes the text):
      the log-probs cannot be tied to the answer;
    * an answer integer spread over several tokens (a tokenizer that splits "10" into "1", "0");
    * an alternative that can begin a longer in-range answer (" 1" on a 1-10 scale may be the
      first token of "10"): its probability is not p(1), so on such scales the expectation is used
      only when no such prefix token is among the alternatives (" 9" / " 10" as whole tokens is fine)."""
    if logprob_score not in LOGPROB_SCORES:
        raise ValueError(f"logprob_score must be one of {LOGPROB_SCORES}, got {logprob_score!r}")
    tokens = _token_texts(logprobs, text) if logprobs else None
    if tokens is None:
        return float(_answer_span(text, markers, lo, hi)[2])
    start, end, value = _answer_span("".join(tokens), markers, lo, hi)
    pos, first, last = 0, None, len(tokens) - 1
    for i, t in enumerate(tokens):
        if first is None and pos + len(t) > start:
            first = i
        pos += len(t)
        if pos >= end:
            last = i
            break
    if first != last:  # a multi-token integer
        return float(value)
    entry = logprobs[first]
    probs: dict[int, float] = {}
    for alt in entry.get("top_logprobs") or [entry]:
        s = _digits(str(alt.get("token", "")))
        if s is None:
            continue
        p = math.exp(float(alt["logprob"]))
        if p > 0 and _begins_longer_answer(s, lo, hi):
            return float(value)  # " 1" may be "10": no single-token distribution over the answers
        if lo <= int(s) <= hi:
            probs[int(s)] = probs.get(int(s), 0.0) + p
    if sum(probs.values()) <= 0:  # the alternatives miss the generated token: it stands alone
        return float(value)
    if logprob_score == "top1":
        return float(max(probs, key=probs.get))
    return sum(k * p for k, p in probs.items()) / sum(probs.values())


class OpenAIJudge(BlackBoxReward):
    """An LVLM/MLLM judge behind an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: e.g. "http://127.0.0.1:8000/v1" (vLLM / SGLang) or a hosted API's base URL.
        model: the served model name.
        prompt_template: text with ``{prompt}``, ``{min}`` and ``{max}`` fields.
        score_min / score_max: the score range asked for (Free²Guide: 1-9).
        api_key_env: environment variable holding the API key (None: no Authorization header).
        score_marker: the text before the answer integer that the template asks for ("Score:"), or a
            list of such texts; the integer right after the last occurrence of one of them is the
            score, nothing else ("Answer:" only if configured: Free²Guide's template). Change it with
            the template.
        use_logprobs: ask for log-probs and score the answer token's distribution when returned.
        logprob_score: "expectation" (default: sum_k k p(k) over in-range integers) or "top1" (the
            most likely in-range integer: Free²Guide's public code; its recipes set it).
        top_logprobs: alternatives per token requested.
        max_tokens / temperature: generation settings (temperature 0: deterministic judges).
        frames: key frames in a video's grid.
        extra_body: extra JSON fields for the request (server-specific options).
        max_workers, timeout_s, retries, backoff_s, cache_size, on_failure, breaker_threshold,
        breaker_cooldown_s, max_abandoned: see ``BlackBoxReward`` (max_workers requests in flight; timed-out
            ones the server still works on count against max_abandoned).
    """

    _client: httpx2.Client | None = None  # the pooled client (``_http``) and the process it belongs to
    _client_pid: int | None = None

    def __init__(self, base_url: str, model: str, prompt_template: str = DEFAULT_TEMPLATE, score_min: int = 1,
                 score_max: int = 9, api_key_env: str | None = "OPENAI_API_KEY",
                 score_marker: str | list[str] = "Score:",
                 use_logprobs: bool = True, logprob_score: str = "expectation", top_logprobs: int = 10,
                 max_tokens: int = 512, temperature: float = 0.0, frames: int = 4,
                 extra_body: dict | None = None, max_workers: int = 8, timeout_s: float | None = 60.0, retries: int = 2,
                 backoff_s: float = 0.5, cache_size: int = 10_000, on_failure: str | float | None = None,
                 breaker_threshold: int | None = 5, breaker_cooldown_s: float = 30.0, max_abandoned: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(max_workers=max_workers, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                         cache_size=cache_size, on_failure=on_failure, breaker_threshold=breaker_threshold,
                         breaker_cooldown_s=breaker_cooldown_s, max_abandoned=max_abandoned,
                         name=name or f"judge[{model}]")
        if score_min >= score_max:
            raise ValueError(f"score_min must be < score_max, got {score_min}, {score_max}")
        for field in ("{prompt}",):
            if field not in prompt_template:
                raise ValueError(f"prompt_template must contain {field}")
        self.markers = answer_markers(score_marker)
        if logprob_score not in LOGPROB_SCORES:
            raise ValueError(f"logprob_score must be one of {LOGPROB_SCORES}, got {logprob_score!r}")
        self.score_marker, self.logprob_score = score_marker, logprob_score
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt_template = model, prompt_template
        self.score_min, self.score_max = score_min, score_max
        self.api_key_env, self.use_logprobs, self.top_logprobs = api_key_env, use_logprobs, top_logprobs
        self.max_tokens, self.temperature, self.frames = max_tokens, temperature, frames
        self.extra_body = dict(extra_body or {})

    def _http(self) -> httpx2.Client:
        """The judge's pooled HTTP client, created on first use (again in a forked process: the
        parent's connections are not shared). Room for every call the backend may see at once."""
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    places = self.max_workers + self.max_abandoned
                    self._client = httpx2.Client(timeout=httpx2.Timeout(self.timeout_s),
                                                 limits=httpx2.Limits(max_connections=places,
                                                                      max_keepalive_connections=places))
                    self._client_pid = os.getpid()
        return self._client

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        client, self._client = self._client, None
        if client is not None and self._client_pid == os.getpid():
            client.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        state = super().__getstate__()
        state["_client"], state["_client_pid"] = None, None  # connections stay with their process
        return state

    def to_object(self, sample: Any) -> bytes:
        return to_png(sample, self.frames)

    def request_body(self, png: bytes, prompt: Any) -> dict:
        text = self.prompt_template.format(prompt=prompt if prompt is not None else "", min=self.score_min,
                                           max=self.score_max)
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.use_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    def score_object(self, obj: bytes, cond: Any) -> float:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = "Bearer " + key
        body = json.dumps(self.request_body(obj, cond)).encode()
        failure: Exception | None = None
        try:
            resp = self._http().post(self.url, content=body, headers=headers)
        except httpx2.TimeoutException as e:
            failure = TimeoutError(f"{self.name}: {type(e).__name__} ({e}) from {self.url}")
        except httpx2.TransportError as e:  # connection refused / reset / dropped, protocol errors
            failure = ConnectionError(f"{self.name}: {type(e).__name__} ({e}) from {self.url}")
        if failure is not None:  # raised outside the handler: the client's error and its request (whose
            raise failure  # headers hold the key) are not kept; the messages hold the URL, never the headers
        if not resp.is_success:
            raise RuntimeError(f"{self.name}: HTTP {resp.status_code} from {self.url}")
        payload = json.loads(resp.content)
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
            lp = (choice.get("logprobs") or {}).get("content") if self.use_logprobs else None
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{self.name}: malformed response {str(payload)[:200]!r}") from e
        return parse_score(text, lp, self.score_min, self.score_max, self.markers, self.logprob_score)


class TransformersJudge(BlackBoxReward):
    """In-process VLM judge: P(score digit | image, template) from one forward pass.

    Args:
        model: local folder or hub id of an image-text-to-text model (``AutoModelForImageTextToText``).
        processor: its processor (default: same path).
        prompt_template: as ``OpenAIJudge``; the text is followed by ``score_marker`` and a space, and
            the next-token distribution over the digits score_min..score_max gives the score.
        score_marker: the answer marker the template asks for ("Score:").
        logprob_score: "expectation" (sum_k k p(k) over the digits) or "top1" (the most likely digit).
        device / dtype: where the model runs.
        Other args: ``BlackBoxReward`` (``max_workers`` defaults to 1: one model, one stream).
    """

    def __init__(self, model: str, processor: str | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                 score_min: int = 1, score_max: int = 9, score_marker: str = "Score:",
                 logprob_score: str = "expectation", device: str = "cpu", dtype: str = "float32", frames: int = 4,
                 max_workers: int = 1, timeout_s: float | None = None, retries: int = 0, cache_size: int = 10_000,
                 on_failure: str | float | None = None, name: str | None = None) -> None:
        super().__init__(max_workers=max_workers, timeout_s=timeout_s, retries=retries, cache_size=cache_size,
                         on_failure=on_failure, name=name or "vlm_judge")
        if not 0 <= score_min < score_max <= 9:
            raise ValueError("TransformersJudge scores single-digit answers: need 0 <= score_min < score_max <= 9")
        if not isinstance(score_marker, str):
            raise ValueError(f"TransformersJudge appends one score_marker to the prompt; got {score_marker!r}")
        answer_markers(score_marker)  # validates it
        if logprob_score not in LOGPROB_SCORES:
            raise ValueError(f"logprob_score must be one of {LOGPROB_SCORES}, got {logprob_score!r}")
        self.score_marker, self.logprob_score = score_marker.strip(), logprob_score
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
        self.vlm.requires_grad_(False)
        self.prompt_template, self.frames = prompt_template, frames
        self.score_min, self.score_max = score_min, score_max
        tok = self.processor.tokenizer
        self.digit_ids = []
        for k in range(score_min, score_max + 1):
            ids = tok.convert_tokens_to_ids([str(k)])
            if not ids or ids[0] is None or ids[0] == tok.unk_token_id:
                raise ValueError(f"the tokenizer of {model} has no single token for {k!r}")
            self.digit_ids.append(ids[0])

    def to_object(self, sample: Any) -> bytes:
        return to_png(sample, self.frames)

    def messages(self, prompt: Any) -> list[dict]:
        text = self.prompt_template.format(prompt=prompt if prompt is not None else "", min=self.score_min,
                                           max=self.score_max)
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    @torch.no_grad()
    def score_object(self, obj: bytes, cond: Any) -> float:
        from PIL import Image

        image = Image.open(io.BytesIO(obj)).convert("RGB")
        proc = self.processor
        if getattr(proc, "chat_template", None):
            text = proc.apply_chat_template(self.messages(cond), add_generation_prompt=True) + self.score_marker + " "
        else:
            image_token = getattr(proc, "image_token", "<image>")
            text = f"{image_token}\n{self.messages(cond)[0]['content'][1]['text']}\n{self.score_marker} "
        inputs = proc(images=image, text=text, return_tensors="pt").to(self.vlm.device)
        logits = self.vlm(**inputs).logits[0, -1].float()
        p = torch.softmax(logits[self.digit_ids], dim=0)
        if self.logprob_score == "top1":
            return float(self.score_min + int(p.argmax()))
        return float((p * torch.arange(self.score_min, self.score_max + 1, dtype=p.dtype)).sum())
