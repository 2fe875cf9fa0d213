"""The video domain's offline LVLM-judge stand-in: a trained model that reads the key-frame grid a judge is sent.

Free²Guide (Kim et al., 2024; public code kjm981995/free2guide_code) steers text-to-video sampling with a
large vision-language model that is shown a 2x2 grid of four key frames (top-left frame 1 ... bottom-right
frame 4), asked how well the video matches the prompt, answers "Reasoning: ..." then "Answer: N" on 1-9,
and is scored by the top-1 log-prob answer token. Offline, ``GridJudgeModel`` plays that judge behind the
same OpenAI-compatible endpoint (``rewardopt.testing.judge_server.JudgeServer``), so recipes and
benchmarks go through the real black-box path: ``OpenAIJudge`` renders the grid (``to_png``), sends it
with the prompt over HTTP, and parses the answer and its log-probs.

The model sees only what the judge receives: the PNG. It decodes it, splits the grid with the known
geometry (2x2 for four key frames, one row otherwise), area-averages each tile back to 16x16 (the
"Frame k" label stays as a bright overlay in a corner; it is trained on grids with labels) and predicts
the four moving-shapes attributes (colour, shape, count, direction). Given the prompt (found in the
message text), ``match_probability`` = prod over heads p(head = the prompt's value); the score is
``lo + (hi - lo) * p`` (1 + 8p on 1-9), which the server writes as "Answer: round(score)" with the
log-probs spread around the score; the reasoning line says what the model sees ("I see two red circles
moving left.") and which attributes differ from the prompt.

Architecture (ours): early fusion. The four tiles are stacked along channels (12) with two coordinate
channels, so the first convolutions compare the frames at each place (where a shape was and where it
went: the direction), and a 2D CNN with two stride-2 stages, global mean and max pooling and an MLP
feeds four linear heads. It differs from the motion reward's factorised spatio-temporal CNN and from the
evaluator's frame-token transformer, and is trained on its own draws (seed 101; the reward's are 201,
the evaluator's 301) of 16x16 clips rendered to grids by ``to_png``'s renderer, with light pixel noise and
blur so a diffusion model's artefacts do not throw it. ``recipes/video/train_judge_tiny.yaml`` writes the
model shipped at ``domains/video/assets/grid_judge`` (``embedded:grid-judge``).

    python -m domains.video.judge --port 8000        # serve it like vLLM: POST /v1/chat/completions

    with serve(port=0) as server:                    # tests and benchmarks
        judge = OpenAIJudge(server.base_url, "grid-judge", prompt_template=FREE2GUIDE_VIDEO_TEMPLATE,
                            score_marker="Answer:", logprob_score="top1")
"""

from __future__ import annotations

import argparse
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from domains.images.shapes import COLOURS, SHAPES
from domains.video.moving_shapes import COUNT_WORDS, DIRECTIONS, HEADS, MotionSpec
from rewardopt.fitting import NetworkFit, load_module, save_module
from rewardopt.media import decode_image as decode  # PNG bytes / PIL / array -> (3, H, W)
from rewardopt.rewards.judges import key_frame_grid
from rewardopt.testing.judge_server import wait_until_interrupted

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:grid-judge": ASSETS / "grid_judge"}
RECIPE = "recipes/video/train_judge_tiny.yaml"
_FORWARD = threading.Lock()
VALUES = {"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS), "direction": list(DIRECTIONS)}


# --- reading the grid ---------------------------------------------------------------------------------
def grid_tiles(image: bytes | Any, frames: int = 4, tile: int = 16) -> torch.Tensor:
    """The key frames of a grid image (``to_png``'s layout: 2x2 for 4 frames, else one row), each
    area-averaged to ``tile`` x ``tile``: (frames, 3, tile, tile). A grid resized on the way (a client
    that sends 512x512) still splits evenly; leftover pixels of an uneven split are dropped."""
    x = decode(image)
    cols = 2 if frames == 4 else frames
    rows = -(-frames // cols)
    h, w = x.shape[1] // rows, x.shape[2] // cols
    if h < 1 or w < 1:
        raise ValueError(f"a {x.shape[2]}x{x.shape[1]} image is too small for a {rows}x{cols} grid")
    tiles = [x[:, r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)][:frames]
    return F.adaptive_avg_pool2d(torch.stack(tiles), tile)  # area averaging (exact block means for integer factors)


_QUOTED = re.compile(r"[\"“”']([^\"“”']+)[\"“”']")
_PROMPT = re.compile(r"\b(?:a|two) (?:" + "|".join(COLOURS) + r") (?:" + "|".join(SHAPES) + r")s? moving (?:"
                     + "|".join(DIRECTIONS) + r")\b", re.IGNORECASE)


def find_prompt(text: str) -> MotionSpec:
    """The moving-shapes prompt in a judge's message: the first quoted text that is one ("...match the
    text "two blue squares moving up"..."), else the first such phrase anywhere; ValueError if none."""
    for m in _QUOTED.finditer(text):
        try:
            return MotionSpec.from_prompt(m.group(1))
        except ValueError:
            continue
    m = _PROMPT.search(text)
    if m is None:
        raise ValueError(f"the grid judge reads moving-shapes prompts ('two blue squares moving up'); found none in "
                         f"{text[:200]!r}")
    return MotionSpec.from_prompt(m.group(0))


def describe(values: dict[str, str]) -> str:
    """'a red circle moving left' / 'two red circles moving left' from attribute values."""
    count = COUNT_WORDS.index(values["count"]) + 1
    return MotionSpec(values["colour"], values["shape"], count, values["direction"]).prompt


# --- the model ----------------------------------------------------------------------------------------
class GridJudgeModel(nn.Module):
    """Early-fusion CNN over the key-frame tiles of a judge's grid: (B, frames, 3, T, T) -> logits per head.

    Args:
        width: channels of the first stage (then 2x and 4x).
        tile: the side tiles are averaged down to (16: the moving-shapes clips').
        frames: key frames in the grid (4: Free²Guide's 2x2).
        hidden: the MLP's width before the heads.
    """

    def __init__(self, width: int = 32, tile: int = 16, frames: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "tile": tile, "frames": frames, "hidden": hidden}
        self.tile, self.frames = tile, frames
        w = width
        ramp = torch.linspace(-1, 1, tile)
        coords = torch.stack([ramp[None, :].expand(tile, tile), ramp[:, None].expand(tile, tile)])
        self.register_buffer("coords", coords.contiguous(), persistent=False)

        def conv(i: int, o: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.GroupNorm(4, o), nn.SiLU()]

        self.body = nn.Sequential(*conv(3 * frames + 2, w), *conv(w, w), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w),
                                  *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w))
        self.mlp = nn.Sequential(nn.Linear(8 * w, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})

    def forward(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        if tiles.ndim != 5 or tuple(tiles.shape[1:]) != (self.frames, 3, self.tile, self.tile):
            raise ValueError(f"expected key-frame tiles (B, {self.frames}, 3, {self.tile}, {self.tile}), got "
                             f"{tuple(tiles.shape)}")
        b = tiles.shape[0]
        x = torch.cat([tiles.flatten(1, 2) * 2 - 1, self.coords.expand(b, -1, -1, -1)], dim=1)
        h = self.body(x)
        h = self.mlp(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))
        return {k: head(h) for k, head in self.heads.items()}

    # --- judging images -------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: Sequence[bytes | Any]) -> dict[str, torch.Tensor]:
        """Per-head class probabilities (B, classes) for grid images (PNG bytes or PIL images)."""
        p = next(self.parameters())
        tiles = torch.stack([grid_tiles(im, self.frames, self.tile) for im in images]).to(p.device, p.dtype)
        with _FORWARD:  # the server answers requests on several threads
            logits = self(tiles)
        return {k: z.float().softmax(-1).cpu() for k, z in logits.items()}

    def judge(self, png: bytes | Any, prompt: str | MotionSpec) -> tuple[float, str]:
        """(p, reasoning): p = prod over heads p(head = the prompt's value); the reasoning names what the
        model's argmax sees and which attributes differ from the prompt."""
        spec = prompt if isinstance(prompt, MotionSpec) else MotionSpec.from_prompt(prompt)
        probs = {k: v[0] for k, v in self.probabilities([png]).items()}
        p = math.prod(float(probs[k][i]) for k, i in spec.labels.items())
        seen = {k: VALUES[k][int(v.argmax())] for k, v in probs.items()}
        wanted = {k: VALUES[k][i] for k, i in spec.labels.items()}
        differ = [k for k in HEADS if seen[k] != wanted[k]]
        text = f"I see {describe(seen)}."
        if differ:
            names = differ[0] if len(differ) == 1 else ", ".join(differ[:-1]) + " and " + differ[-1]
            verb = "does" if len(differ) == 1 else "do"
            text += f" The prompt asks for {spec.prompt}, so the {names} {verb} not match."
        else:
            text += " That is what the prompt asks for."
        return p, text

    def match_probability(self, png: bytes | Any, prompt: str | MotionSpec) -> float:
        """prod over heads p(head = the prompt's value | the grid)."""
        return self.judge(png, prompt)[0]

    def prompt_scorer(self, png: bytes, text: str, lo: int, hi: int) -> tuple[float, str]:
        """``JudgeServer``'s prompt scorer: (lo + (hi - lo) * p, reasoning) for the prompt quoted in ``text``."""
        p, reasoning = self.judge(png, find_prompt(text))
        return lo + (hi - lo) * p, reasoning

    # --- saving -----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` + ``model.safetensors``."""
        save_module(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path = "embedded:grid-judge") -> "GridJudgeModel":
        """A folder from ``save_pretrained`` or ``embedded:grid-judge``; in eval mode."""
        return load_module(cls, path, EMBEDDED, RECIPE)


# --- training -----------------------------------------------------------------------------------------
def blur(videos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur (5 taps, replicate padding) of (B, ..., H, W) with one sigma per item."""
    r = 2
    t = torch.arange(-r, r + 1, dtype=videos.dtype, device=videos.device)
    k = torch.exp(-t**2 / (2 * sigma.to(videos.dtype)[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)
    shape = videos.shape
    per_item = math.prod(shape[1:-2])
    x = videos.reshape(1, shape[0] * per_item, *shape[-2:])
    kk = k.repeat_interleave(per_item, 0)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kk[:, None, None, :], groups=x.shape[1])
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kk[:, None, :, None], groups=x.shape[1])
    return x.reshape(shape)


def degrade(videos: torch.Tensor, noise_std: float, blur_sigma: float, blur_p: float = 0.5,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Light artefacts, drawn per clip: Gaussian blur (sigma uniform in [0.3, blur_sigma]) with
    probability ``blur_p``, then pixel noise (std uniform in [0, noise_std])."""
    b, dev, ones = videos.shape[0], videos.device, [1] * (videos.ndim - 1)
    if blur_sigma > 0 and blur_p > 0:
        sigma = 0.3 + max(0.0, blur_sigma - 0.3) * torch.rand(b, generator=generator, device=dev)
        on = (torch.rand(b, generator=generator, device=dev) < blur_p).view(b, *ones)
        videos = torch.where(on, blur(videos, sigma), videos)
    if noise_std > 0:
        std = noise_std * torch.rand(b, *ones, generator=generator, device=dev)
        videos = videos + std * torch.randn(videos.shape, generator=generator, device=dev, dtype=videos.dtype)
    return videos.clamp(0, 1)


def render_tiles(videos: torch.Tensor, frames: int = 4, min_tile: int = 96, tile: int = 16) -> torch.Tensor:
    """(B, F, 3, H, W) clips -> the tiles the judge reads from their ``to_png`` grids: (B, frames, 3, tile, tile).
    ``to_png`` encodes exactly ``key_frame_grid``'s pixels (PNG is lossless), so training skips the encoding."""
    return torch.stack([grid_tiles(key_frame_grid(v.detach().float().cpu(), frames, min_tile), frames, tile)
                        for v in videos])


class GridJudgeTraining(NetworkFit):
    """Trains ``GridJudgeModel`` on moving-shapes clips rendered to labelled key-frame grids (``to_png``'s
    renderer, the label included), read back as the served judge reads them.

    Training clips get light artefacts first (``degrade``: blur, pixel noise), then 8-bit grids as the
    judge receives them. Cross-entropy summed over the four heads; held-out per-head accuracies and
    ``acc_all`` (all four right) on clean grids, and ``aug_acc_all`` on degraded ones. Exports
    ``config.json`` + ``model.safetensors`` and ``grid_judge_fit.json`` to ``output_dir`` at the end.

    Args:
        width, hidden: ``GridJudgeModel``'s.
        noise_std: max std of the pixel noise; blur_sigma: max blur sigma (px at 16x16); blur_p: how often.
        min_tile: ``to_png``'s tile size the grids are rendered at.
        seed: the initialisation.
        lr, weight_decay, warmup_steps, decay, output_dir: ``NetworkFit``'s.
    """

    fit_name = "grid_judge"

    def __init__(self, output_dir: str | None = None, width: int = 32, hidden: int = 128, lr: float = 3e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 0, decay: bool = False, noise_std: float = 0.05,
                 blur_sigma: float = 1.0, blur_p: float = 0.5, min_tile: int = 96, seed: int = 0) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir)
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.network = GridJudgeModel(width=width, hidden=hidden)

    def _step(self, videos: torch.Tensor, batch: dict, stage: str):
        tiles = render_tiles(videos, self.network.frames, self.hparams.min_tile, self.network.tile).to(videos.device)
        logits = self.network(tiles)
        loss = sum(F.cross_entropy(z, batch[k]) for k, z in logits.items())
        n = videos.shape[0]
        correct = torch.stack([logits[k].argmax(-1) == batch[k] for k in logits])
        if stage == "val/aug":
            self.log("val/aug_acc_all", correct.all(0).float().mean(), batch_size=n)
            return loss
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
        for k, c in zip(logits, correct):
            self.log(f"{stage}/acc_{k}", c.float().mean(), batch_size=n)
        self.log(f"{stage}/acc_all", correct.all(0).float().mean(), batch_size=n)
        return loss

    def _degrade(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = self.hparams
        return degrade(videos, h.noise_std, h.blur_sigma, h.blur_p, generator)

    def training_step(self, batch, batch_idx):
        return self._step(self._degrade(batch["video"]), batch, "train")

    def validation_step(self, batch, batch_idx):
        videos = batch["video"]
        self._step(videos, batch, "val")
        gen = torch.Generator(device=videos.device).manual_seed(batch_idx)  # the same artefacts at every validation
        self._step(self._degrade(videos, gen), batch, "val/aug")

    def fit_parameters(self):
        return self.network.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.network.save_pretrained(folder)
        return folder


# --- serving ------------------------------------------------------------------------------------------
@contextmanager
def serve(port: int = 0, host: str = "127.0.0.1", model: str | Path = "embedded:grid-judge",
          **server_kwargs) -> Iterator[Any]:
    """The grid judge behind an OpenAI-compatible ``/v1/chat/completions`` (``JudgeServer``, answers
    "Reasoning: ...\\nAnswer: N" with log-probs); yields the server (``.base_url``, ``.requests``)."""
    from rewardopt.testing.judge_server import JudgeServer

    judge = GridJudgeModel.from_pretrained(model)
    server_kwargs.setdefault("answer_style", "free2guide")
    with JudgeServer(host, port, prompt_scorer=judge.prompt_scorer, **server_kwargs) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the trained grid judge as an OpenAI-compatible endpoint "
                                "(POST /v1/chat/completions, vLLM-style log-probs).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="embedded:grid-judge", help="a save_pretrained folder or embedded:grid-judge")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # one tiny forward per request, on the server's request threads
    with serve(a.port, a.host, a.model, latency_s=a.latency) as server:
        print(f"grid judge ({a.model}) on {server.base_url} (Ctrl-C to stop)", flush=True)
        wait_until_interrupted()


if __name__ == "__main__":
    main()
