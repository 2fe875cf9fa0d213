"""Pictures of super-resolution results: per glyph, LR | GT, then SR | |SR - GT| for each model, captioned.

``comparison_rows(conds, rows)`` builds the panel as a PIL image (``rows``: (name, SR outputs, captions));
``save_panel`` writes it. The difference tile is |SR - GT| averaged over colour and scaled x4 (clipped),
so a hallucinated stroke shows as a bright shape and blur as a faint outline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from domains.super_resolution.glyphs import upsample

SCALE = 3  # each 32 px tile shown at 96 px
CAPTION = 14
DIFF_GAIN = 4.0
GAP = 6  # px after the LR | GT pair and after each model's pair


def column_x(col: int, side: int) -> int:
    """Left edge of tile column ``col`` (0 LR, 1 GT, then SR, diff per model) for tiles ``side`` px wide."""
    return col * side + (0 if col < 2 else GAP * (1 + (col - 2) // 2))


def _tile(img: torch.Tensor) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * SCALE, pil.height * SCALE), Image.NEAREST)


def comparison_rows(conds: Sequence[dict], rows: Sequence[tuple[str, torch.Tensor, Sequence[str]]]) -> Image.Image:
    """One line per glyph: "LR (bicubic)" | "GT", then per model "<name>" SR | |SR - GT|, with each SR's
    caption (e.g. its HS and proxy value) under it. ``rows``: (name, (N, 3, H, W) SR outputs, N captions)."""
    if not conds:
        raise ValueError("comparison_rows needs at least one condition")
    n = len(conds)
    for name, sr, caps in rows:
        if len(sr) != n or len(caps) != n:
            raise ValueError(f"model {name!r}: {len(sr)} outputs and {len(caps)} captions for {n} glyphs")
    hr = torch.stack([c["hr"] for c in conds])
    lr_up = upsample(torch.stack([c["image"] for c in conds]), hr.shape[-1] // conds[0]["image"].shape[-1])
    side = hr.shape[-1] * SCALE
    cols = 2 + 2 * len(rows)
    width = cols * side + (len(rows) + 1) * GAP
    height = CAPTION + n * (side + CAPTION)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)

    def x_of(col: int) -> int:
        return column_x(col, side)

    heads = ["LR (bicubic)", "GT"] + [h for name, _, _ in rows for h in (name, "|SR - GT| x4")]
    for col, h in enumerate(heads):
        draw.text((x_of(col) + 2, 1), h, fill=(0, 0, 0))
    for i in range(n):
        y = CAPTION + i * (side + CAPTION)
        panel.paste(_tile(lr_up[i]), (x_of(0), y))
        panel.paste(_tile(hr[i]), (x_of(1), y))
        for m, (_, sr, caps) in enumerate(rows):
            diff = ((sr[i] - hr[i]).abs().mean(0, keepdim=True) * DIFF_GAIN).clamp(0, 1).expand(3, -1, -1)
            panel.paste(_tile(sr[i]), (x_of(2 + 2 * m), y))
            panel.paste(_tile(diff), (x_of(3 + 2 * m), y))
            draw.text((x_of(2 + 2 * m) + 2, y + side + 1), caps[i], fill=(0, 0, 0))
    return panel


def save_panel(panel: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)
    return path
