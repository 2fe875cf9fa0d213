"""Videos a person can watch: key frames, animated GIFs (Pillow) and MP4s (when ffmpeg is installed).

Videos are (F, 3, H, W) tensors in [0, 1]. ``key_frames`` picks the evenly spaced frames that judges and
grids show (Free²Guide's public code: frames 0, 5, 10, 15 of 16, i.e. ``linspace(0, F - 1, 4)`` rounded).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from einops import rearrange


def decode_image(image) -> torch.Tensor:
    """PNG/JPEG bytes, a PIL image or an (H, W, 3) uint8 array -> (3, H, W) float in [0, 1] (what a judge
    server receives, back as a tensor)."""
    import io

    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    a = np.array(image, dtype=np.float32, copy=True)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {a.shape}")
    return torch.from_numpy(a / 255.0).permute(2, 0, 1)


def key_frames(num_frames: int, k: int = 4) -> list[int]:
    """``k`` evenly spaced frame indices from the first to the last (all frames when there are fewer)."""
    if num_frames < 1 or k < 1:
        raise ValueError(f"need num_frames >= 1 and k >= 1, got {num_frames}, {k}")
    return torch.linspace(0, num_frames - 1, min(k, num_frames)).round().long().tolist()


def check_video(video: torch.Tensor) -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] not in (1, 3):
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video (F, 3, H, W) in [0, 1], got {shape}")
    return video.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1)


def to_uint8_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H*scale, W*scale, 3) uint8 (nearest-neighbour upscaling)."""
    v = (check_video(video) * 255).round().byte()
    if scale > 1:
        v = v.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return rearrange(v, "f c h w -> f h w c").numpy()


def key_frame_strip(video: torch.Tensor, k: int = 4, gap: int = 1) -> torch.Tensor:
    """The ``k`` key frames side by side, (3, H, k*W + (k-1)*gap), separated by white columns."""
    v = check_video(video)
    tiles = []
    for j, i in enumerate(key_frames(v.shape[0], k)):
        if j and gap:
            tiles.append(torch.ones(3, v.shape[2], gap))
        tiles.append(v[i])
    return torch.cat(tiles, dim=2)


def save_gif(video: torch.Tensor, path: str | Path, fps: float = 8.0, scale: int = 4) -> Path:
    """An animated, looping GIF with one frame per video frame (Pillow)."""
    from PIL import Image

    frames = [Image.fromarray(a) for a in to_uint8_frames(video, scale)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0,
                   optimize=False, disposal=1)
    return path


def ffmpeg() -> str | None:
    """The ffmpeg executable on PATH, or None."""
    return shutil.which("ffmpeg")


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 8.0, scale: int = 8) -> Path:
    """An H.264 MP4 through the ``ffmpeg`` executable (raw RGB frames on its stdin). Raises
    FileNotFoundError when ffmpeg is not installed (``apt-get install ffmpeg``)."""
    exe = ffmpeg()
    if exe is None:
        raise FileNotFoundError("save_mp4 needs the ffmpeg executable on PATH (apt-get install ffmpeg); GIFs need "
                                "only Pillow")
    frames = to_uint8_frames(video, scale)
    h, w = frames.shape[1:3]
    pad = f"pad={w + w % 2}:{h + h % 2}"  # H.264 wants even sizes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps),
           "-i", "-", "-vf", pad, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    return path


def save_side_by_side_gif(videos: list[torch.Tensor], path: str | Path, fps: float = 8.0, scale: int = 4,
                          gap: int = 1) -> Path:
    """Several videos of equal shape playing side by side in one GIF (e.g. before | after)."""
    if not videos:
        raise ValueError("no videos to save")
    vs = [check_video(v) for v in videos]
    if len({tuple(v.shape) for v in vs}) != 1:
        raise ValueError(f"side-by-side videos must share a shape, got {[tuple(v.shape) for v in vs]}")
    parts = []
    for j, v in enumerate(vs):
        if j and gap:
            parts.append(torch.ones(v.shape[0], 3, v.shape[2], gap))
        parts.append(v)
    return save_gif(torch.cat(parts, dim=3), path, fps, scale)
