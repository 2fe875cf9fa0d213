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


# ----------------------------------------------------------------------------- image comparisons
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) of images in [0, 1], one per row of (B, C, H, W)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5, C1 = 0.01^2, C2 = 0.03^2,
    per channel, averaged over valid windows and channels), one per row of (B, C, H, W) images in [0, 1]."""
    import torch.nn.functional as F

    a, b = a.float(), b.float()
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    x = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).to(a.device)
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731  (valid windows only)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
