"""The video domain's grid judge: to_png's key-frame grid (geometry, order, labels), the trained grid-reading
model behind the OpenAI-compatible server (Free²Guide's answer format, log-probs that spell it, matching
clips ranked above mismatching ones through OpenAIJudge), save/load, and its training recipe."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from io import BytesIO

import httpx2
import numpy as np
import pytest
import torch

from domains.video.judge import GridJudgeModel, find_prompt, grid_tiles, render_tiles, serve
from domains.video.moving_shapes import DIRECTIONS, HEADS, MotionSpec, MovingShapesDataset
from rewardopt.media import key_frames
from rewardopt.rewards.judges import FREE2GUIDE_VIDEO_TEMPLATE, OpenAIJudge, _label, key_frame_grid, to_png
from tests.conftest import ROOT

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def coloured_frames(n=8, h=16, w=16):
    """Frame i is one solid colour of its own (so a tile tells which frame it shows)."""
    v = torch.zeros(n, 3, h, w)
    for i in range(n):
        v[i, 0], v[i, 1], v[i, 2] = i / (n - 1), 1 - i / (n - 1), 0.25 + 0.05 * i
    return v


def test_grid_tiles_show_the_key_frames_in_reading_order_with_position_labels():
    from PIL import Image

    video = coloured_frames()
    a = np.asarray(Image.open(BytesIO(to_png(video))).convert("RGB")).astype(int)
    assert a.shape == (192, 192, 3)  # 2x2 tiles of 16 px frames upscaled x6 to min_tile = 96
    idx = key_frames(8, 4)
    assert idx == [0, 2, 5, 7]
    for k, fi in enumerate(idx):
        r, c = divmod(k, 2)
        t = a[r * 96:(r + 1) * 96, c * 96:(c + 1) * 96]
        want = (video[fi].permute(1, 2, 0).numpy() * 255).round().astype(int)[0, 0]
        assert (np.abs(t[40:, :] - want) <= 1).all() and (np.abs(t[:, 60:] - want) <= 1).all(), f"tile {k}"
        # the label: "Frame k+1" (the grid position, as Free²Guide's prompt numbers the frames) over the
        # top-left corner; for 8 frames the frame index would give "Frame 1, 3, 6, 8" instead
        expected = Image.new("RGB", (96, 96), tuple(int(x) for x in want))
        label = _label(f"Frame {k + 1}", 12)
        expected.paste(label, (2, 1), label)
        assert np.array_equal(t, np.asarray(expected).astype(int)), f"tile {k} is not frame {fi} labelled Frame {k + 1}"
        yellowish = (t[..., 0] > 180) & (t[..., 1] > 180) & (t[..., 2] < 100)
        assert yellowish.sum() > 30 and not yellowish[20:].any() and not yellowish[:, 60:].any()
    # the judge's reader gets the frames back: area averages of each tile (only the label corner differs)
    tiles = grid_tiles(to_png(video))
    assert tiles.shape == (4, 3, 16, 16)
    assert torch.allclose(tiles[:, :, 8:, :], video[idx][:, :, 8:, :], atol=1 / 255)
    assert (tiles[:, :, :3, :6] - video[idx][:, :, :3, :6]).abs().amax() > 0.05
    # geometry: integer upscaling to >= min_tile on the short side; min_tile=1 is the raw grid
    assert BytesIO(to_png(torch.rand(8, 3, 16, 20))).getbuffer().nbytes > 0
    assert Image.open(BytesIO(to_png(torch.rand(8, 3, 16, 20)))).size == (240, 192)
    assert Image.open(BytesIO(to_png(torch.rand(8, 3, 16, 20), min_tile=1))).size == (40, 32)
    assert Image.open(BytesIO(to_png(torch.rand(3, 16, 16)))).size == (16, 16)  # images are not touched


def test_training_renders_exactly_the_png_the_judge_receives():
    v = MovingShapesDataset(2, seed=7)[1]["video"]
    assert torch.equal(render_tiles(v[None])[0], grid_tiles(to_png(v)))
    assert torch.equal(grid_tiles(key_frame_grid(v)), grid_tiles(to_png(v)))


@pytest.fixture(scope="module")
def judge_model():
    return GridJudgeModel.from_pretrained("embedded:grid-judge")


@pytest.fixture(scope="module")
def clips():
    """Clips from a seed the judge was neither trained (101) nor validated (102) on."""
    ds = MovingShapesDataset(48, seed=4343)
    items = [ds[i] for i in range(len(ds))]
    return [it["video"] for it in items], [it["prompt"] for it in items]


def test_shipped_judge_reads_held_out_grids(judge_model, clips):
    videos, prompts = clips
    probs = judge_model.probabilities([to_png(v) for v in videos])
    specs = [MotionSpec.from_prompt(p) for p in prompts]
    acc = {k: float(np.mean([int(probs[k][i].argmax()) == s.labels[k] for i, s in enumerate(specs)])) for k in HEADS}
    assert min(acc.values()) >= 0.85, acc
    p = judge_model.match_probability(to_png(videos[0]), prompts[0])
    expected = float(np.prod([float(probs[k][0, i]) for k, i in specs[0].labels.items()]))
    assert p == pytest.approx(expected, rel=1e-5)


def test_save_and_load_round_trip(judge_model, clips, tmp_path):
    judge_model.save_pretrained(tmp_path / "j")
    assert {f.name for f in (tmp_path / "j").iterdir()} == {"config.json", "model.safetensors"}
    again = GridJudgeModel.from_pretrained(tmp_path / "j")
    png = to_png(clips[0][0])
    for k, v in judge_model.probabilities([png]).items():
        assert torch.equal(v, again.probabilities([png])[k])
    with pytest.raises(FileNotFoundError, match="train_judge_tiny"):
        GridJudgeModel.from_pretrained(tmp_path / "missing")


def test_find_prompt_reads_the_quoted_moving_shapes_prompt():
    text = FREE2GUIDE_VIDEO_TEMPLATE.format(prompt="two blue squares moving up", min=1, max=9)
    assert find_prompt(text) == MotionSpec("blue", "square", 2, "up")
    assert find_prompt("Does a red circle moving left fit?") == MotionSpec("red", "circle", 1, "left")
    with pytest.raises(ValueError, match="moving-shapes prompts"):
        find_prompt('How well does the video match "a cat on a sofa"?')


def post(base_url, text, png, logprobs=True):
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "grid-judge", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]}
    if logprobs:
        body.update(logprobs=True, top_logprobs=5)
    return httpx2.post(base_url + "/chat/completions", content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"}, timeout=10)


def test_served_answer_is_reasoning_then_answer_with_logprobs_that_spell_it(clips):
    videos, prompts = clips
    spec = MotionSpec.from_prompt(prompts[0])
    wrong = replace(spec, direction=OPPOSITE[spec.direction])
    with serve(port=0) as server:
        good = post(server.base_url, FREE2GUIDE_VIDEO_TEMPLATE.format(prompt=spec.prompt, min=1, max=9),
                    to_png(videos[0])).json()["choices"][0]
        bad = post(server.base_url, FREE2GUIDE_VIDEO_TEMPLATE.format(prompt=wrong.prompt, min=1, max=9),
                   to_png(videos[0])).json()["choices"][0]
        plain = post(server.base_url, f'Rate "{spec.prompt}".', to_png(videos[0]), logprobs=False).json()
        refused = post(server.base_url, 'Rate "a cat".', to_png(videos[0]))
    for choice in (good, bad):
        text = choice["message"]["content"]
        assert re.fullmatch(r"Reasoning: I see (a|two) [a-z ]+ moving (left|right|up|down)\.[^\n]*\nAnswer: [1-9]",
                            text)
        tokens = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in tokens) == text
        last = tokens[-1]
        assert last["token"] == text[-1] and last["top_logprobs"][0]["token"] == text[-1]
    assert "That is what the prompt asks for." in good["message"]["content"]
    assert f"asks for {wrong.prompt}, so the direction does not match." in bad["message"]["content"]
    assert int(good["message"]["content"][-1]) > int(bad["message"]["content"][-1])
    assert "logprobs" not in plain["choices"][0]
    assert refused.status_code == 400 and "moving-shapes" in refused.json()["error"]["message"]


def test_served_judge_ranks_matching_clips_above_mismatching_ones_through_openai_judge(clips):
    videos, prompts = clips
    n = 8
    video = torch.stack(videos[:n])
    mismatched = [replace(MotionSpec.from_prompt(p), direction=OPPOSITE[MotionSpec.from_prompt(p).direction]).prompt
                  for p in prompts[:n]]
    other_colour = [replace(MotionSpec.from_prompt(p), colour="green" if "green" not in p else "red").prompt
                    for p in prompts[:n]]
    with serve(port=0) as server:
        judge = OpenAIJudge(base_url=server.base_url, model="grid-judge", prompt_template=FREE2GUIDE_VIDEO_TEMPLATE,
                            score_marker="Answer:", logprob_score="top1", api_key_env=None, max_workers=4,
                            retries=0, timeout_s=10)
        right = judge(video, prompts[:n]).total
        wrong_way = judge(video, mismatched).total
        wrong_colour = judge(video, other_colour).total
        assert server.requests == 3 * n
    assert set(right.tolist()) | set(wrong_way.tolist()) <= set(map(float, range(1, 10)))  # top-1 answer tokens
    assert (right > wrong_way).float().mean() >= 7 / 8 and (right > wrong_colour).float().mean() >= 7 / 8
    assert right.mean() >= 7 and wrong_way.mean() <= 3 and list(DIRECTIONS) == list(OPPOSITE)


def test_training_recipe_fits_two_steps(tmp_path, monkeypatch):
    """As tests/test_recipes.py runs every recipe (its `# Test: fit 2` line)."""
    from tests.test_recipes import check_fit, parse_test_header, run_recipe

    recipe = ROOT / "recipes" / "video" / "train_judge_tiny.yaml"
    spec = parse_test_header(recipe.read_text())
    assert spec.action == "fit" and spec.steps == 2
    monkeypatch.chdir(ROOT)
    run = run_recipe(recipe, spec, tmp_path)
    check_fit(run)
    assert (run.out / "model.safetensors").is_file() and (run.out / "config.json").is_file()
    assert json.loads((run.out / "grid_judge_fit.json").read_text())["steps"] == 2
    GridJudgeModel.from_pretrained(run.out)
