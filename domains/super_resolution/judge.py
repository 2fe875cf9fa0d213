"""The Hallucination Score judge: an MLLM shown the LR input and the SR output side by side, and the
offline model the project serves in its place.

Ren et al. (arXiv 2507.14367) prompt a multimodal LLM to assess hallucinated elements of an SR output
and call its rating the Hallucination Score (HS); the prompt is not public. Our reading:

* **The panel** (``hallucination_panel``): the LR input upsampled to HR size (bicubic, as a viewer
  would see it) on the left and the SR output on the right, each nearest-upscaled by an integer factor
  to at least ``min_tile`` px (128: a 32 px glyph becomes 128 px, so a real LVLM sees its strokes), a
  gap between them and a caption strip above — "LR input (upsampled)" and "SR output" — so the tiles
  themselves are clean. The geometry is fixed in fractions of the panel (caption strip 1/5 of the
  height, gap 1/17 of the width), so ``panel_tiles`` splits a panel even after a client resized it.
* **The prompt** (``HALLUCINATION_TEMPLATE``, recipes carry their own copy): what the two pictures
  are, what counts as a hallucination (detail the LR input does not support; blur and noise do not
  count), "Reasoning: ..." then "Answer: N" from 1 (no hallucination) to 9 (severe) — Free²Guide's
  answer shape, read with ``score_marker: "Answer:"``.
* **The served model** (``HallucinationJudgeModel``, ``python -m domains.super_resolution.judge``,
  ``serve(port=0)``): it sees only the panel PNG. It reads the LR tile back (area-averaged to HR size,
  then ``downsample``: the 8x8 LR up to the bicubic round trip and 8-bit rounding), gets
  p_LR(c | LR) from the LR classifier (``embedded:sr-lr-classifier``) and p_oracle(c | SR) from the
  oracle network on the SR tile (``embedded:sr-oracle``), and answers

      HS_judge = sum_c p_LR(c | LR) * (1 - p_oracle(c | SR))

  — the oracle's Hallucination Score in expectation over the classes the LR input allows, since the
  judge cannot see the ground truth — as the rating 1 + 8 HS_judge (the server writes
  "Answer: round(rating)" with log-probs spread around it, so the expectation recovers the rating).
  When the LR input is ambiguous (3 or 8?) a sharp 8 and a sharp 3 both score about 0.5: the judge, like
  any GT-free judge, cannot tell which is the hallucination; it does catch outputs the input rules out.

    with serve(port=0) as server:
        judge = HallucinationJudge(server.base_url)        # domains.super_resolution.rewards
"""

from __future__ import annotations

import argparse
import functools
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from domains.super_resolution.glyphs import downsample, upsample
from domains.super_resolution.hallucination import GlyphClassifier, load_classifier
from rewardopt.media import decode_image as decode  # PNG bytes / PIL / array -> (3, H, W)
from rewardopt.testing.judge_server import wait_until_interrupted

LABELS = ("LR input (upsampled)", "SR output")
HEADER, GAP = 1 / 4, 1 / 8  # caption strip height and gap width, as fractions of the tile side
_FORWARD = threading.Lock()

HALLUCINATION_TEMPLATE = (
    "The image shows two pictures side by side. On the left, labelled \"LR input (upsampled)\", is a "
    "low-resolution image of {prompt}, enlarged. On the right, labelled \"SR output\", is a super-resolution "
    "model's reconstruction of it at four times the resolution. A hallucination is a detail in the SR output that "
    "the low-resolution input does not support: a stroke, gap, tail or corner that changes what the object is, or "
    "that would not look like the input once the output is shrunk back to its size. Sharpening, blur or mild noise "
    "are not hallucinations. Rate how much hallucinated detail the SR output contains. First write \"Reasoning:\" "
    "followed by your reasoning, then a last line \"Answer: N\" with N one integer from {min} (no hallucination) "
    "to {max} (severe hallucination)."
)
"""The default Hallucination Score prompt (our wording; the paper's is not public). Fields: ``{prompt}``
(the SR condition's coarse prompt, "a digit"), ``{min}``, ``{max}``; read with ``score_marker: "Answer:"``."""


# --- the panel ------------------------------------------------------------------------------------
def _to_pil(img: torch.Tensor, scale: int):
    from PIL import Image

    a = (img.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    pil = Image.fromarray(a.permute(1, 2, 0).numpy())
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST) if scale > 1 else pil


@functools.lru_cache(maxsize=32)
def _caption(text: str, width: int, height: int):
    """``text`` in white on the panel's dark strip, as large as fits ``width`` x ``height`` (an L image)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(img)
    size = max(6, int(height * 0.7))
    while size > 6:
        left, top, right, bottom = d.textbbox((0, 0), text, font=ImageFont.load_default(size=size))
        if right - left <= width - 4 and bottom - top <= height - 2:
            break
        size -= 1
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    d.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text, fill=255, font=font)
    return img


def hallucination_panel(lr: torch.Tensor, sr: torch.Tensor, min_tile: int = 128, labels: tuple[str, str] = LABELS):
    """The judge's view (a PIL image): the LR input (3, h, w), bicubic-upsampled to the SR output's size,
    beside the SR output (3, H, W), each nearest-upscaled by the smallest integer factor that makes it at
    least ``min_tile`` px, under a caption strip with ``labels``."""
    from PIL import Image

    if lr.ndim != 3 or sr.ndim != 3 or lr.shape[0] != 3 or sr.shape[0] != 3:
        raise ValueError(f"expected an LR (3, h, w) and an SR (3, H, W) image; got {tuple(lr.shape)}, "
                         f"{tuple(sr.shape)}")
    factor = sr.shape[-1] // lr.shape[-1]
    if factor < 1 or tuple(lr.shape[-2:]) != (sr.shape[-2] // factor, sr.shape[-1] // factor):
        raise ValueError(f"the SR output {tuple(sr.shape[-2:])} is not an integer multiple of the LR "
                         f"{tuple(lr.shape[-2:])}")
    lr_up = upsample(lr[None].float().cpu(), factor)[0] if factor > 1 else lr
    scale = max(1, -(-min_tile // min(sr.shape[-2:])))
    th, tw = sr.shape[-2] * scale, sr.shape[-1] * scale
    head, gap = round(th * HEADER), round(tw * GAP)
    panel = Image.new("RGB", (2 * tw + gap, head + th), (32, 32, 32))
    for k, (img, text) in enumerate(zip((lr_up, sr), labels)):
        x = k * (tw + gap)
        panel.paste(_to_pil(img, scale), (x, head))
        panel.paste((255, 255, 255), (x, 0), _caption(text, tw, head))
    return panel


def panel_png(lr: torch.Tensor, sr: torch.Tensor, min_tile: int = 128, labels: tuple[str, str] = LABELS) -> bytes:
    """``hallucination_panel`` as PNG bytes (what ``HallucinationJudge`` sends)."""
    buf = io.BytesIO()
    hallucination_panel(lr, sr, min_tile, labels).save(buf, format="PNG")
    return buf.getvalue()


def panel_tiles(image: bytes | Any, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR input upsampled, SR output), each (3, size, size), read back from a panel: the tiles' boxes in
    the panel's fixed fractions, each area-averaged to ``size`` (exact for an unresized panel)."""
    x = decode(image)
    h, w = x.shape[1:]
    unit_w, unit_h = w / (2 + GAP), h / (1 + HEADER)  # the tile side, from the width and from the height
    if min(unit_w, unit_h) < size / 4:
        raise ValueError(f"a {w}x{h} image is too small to be a hallucination panel of {size} px tiles")
    top = round(unit_h * HEADER)
    boxes = [(0, round(unit_w)), (round(unit_w * (1 + GAP)), w)]
    tiles = [x[:, top:, a:b] for a, b in boxes]
    return tuple(F.adaptive_avg_pool2d(t[None], size)[0] for t in tiles)


# --- the served model -------------------------------------------------------------------------------
class HallucinationJudgeModel:
    """HS_judge = sum_c p_LR(c | LR) (1 - p_oracle(c | SR)) from a panel PNG (see the module docstring).

    Args:
        oracle: the HR classifier on the SR tile (a folder or ``embedded:sr-oracle``).
        lr_classifier: the LR classifier on the LR tile read back to 8x8 (``embedded:sr-lr-classifier``).
    """

    def __init__(self, oracle: str | Path = "embedded:sr-oracle",
                 lr_classifier: str | Path = "embedded:sr-lr-classifier") -> None:
        self.oracle: GlyphClassifier = load_classifier(str(oracle))
        self.lr_classifier: GlyphClassifier = load_classifier(str(lr_classifier))
        if self.oracle.classes != self.lr_classifier.classes:
            raise ValueError(f"the oracle's classes {self.oracle.classes} differ from the LR classifier's "
                             f"{self.lr_classifier.classes}")
        self.factor = self.oracle.size // self.lr_classifier.size

    def probabilities(self, png: bytes | Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_LR (classes,), p_oracle (classes,)) for a panel."""
        lr_up, sr = panel_tiles(png, self.oracle.size)
        lr = downsample(lr_up[None], self.factor)
        with _FORWARD:  # the server answers on several threads
            return self.lr_classifier.probabilities(lr)[0], self.oracle.probabilities(sr[None])[0]

    def judge(self, png: bytes | Any) -> tuple[float, str]:
        """(HS_judge in [0, 1], reasoning naming what the input allows and what the output shows)."""
        p_lr, p_sr = self.probabilities(png)
        hs = float((p_lr * (1 - p_sr)).sum())
        names = self.oracle.classes
        allowed = [names[int(i)] for i in p_lr.argsort(descending=True)[:2] if p_lr[i] >= 0.2]
        seen = names[int(p_sr.argmax())]
        text = (f"The low-resolution input looks like {' or '.join(map(repr, allowed))}; the SR output shows "
                f"{seen!r}.")
        text += (" The output commits to a detail the input does not support." if hs >= 0.5 else
                 " The output is consistent with the input.")
        return hs, text

    def prompt_scorer(self, png: bytes, text: str, lo: int, hi: int) -> tuple[float, str]:
        """``JudgeServer``'s prompt scorer: (lo + (hi - lo) HS_judge, reasoning); the text is not needed."""
        hs, reasoning = self.judge(png)
        return lo + (hi - lo) * hs, reasoning


@contextmanager
def serve(port: int = 0, host: str = "127.0.0.1", oracle: str | Path = "embedded:sr-oracle",
          lr_classifier: str | Path = "embedded:sr-lr-classifier", **server_kwargs) -> Iterator[Any]:
    """The offline HS judge behind an OpenAI-compatible ``/v1/chat/completions`` (``JudgeServer``,
    "Reasoning: ...\\nAnswer: N" with log-probs); yields the server (``.base_url``, ``.requests``)."""
    from rewardopt.testing.judge_server import JudgeServer

    judge = HallucinationJudgeModel(oracle, lr_classifier)
    server_kwargs.setdefault("answer_style", "free2guide")
    with JudgeServer(host, port, prompt_scorer=judge.prompt_scorer, **server_kwargs) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the offline Hallucination Score judge as an OpenAI-compatible "
                                "endpoint (POST /v1/chat/completions, vLLM-style log-probs).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--oracle", default="embedded:sr-oracle")
    p.add_argument("--lr-classifier", default="embedded:sr-lr-classifier")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with serve(a.port, a.host, a.oracle, a.lr_classifier, latency_s=a.latency) as server:
        print(f"hallucination judge on {server.base_url} (Ctrl-C to stop)", flush=True)
        wait_until_interrupted()


if __name__ == "__main__":
    main()
