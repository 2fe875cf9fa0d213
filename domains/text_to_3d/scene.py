"""A differentiable 3D scene in pure torch: an RGB + density voxel grid, orbit cameras and volume rendering.

World: y is up, the scene lives in the cube [-1, 1]^3. A camera at azimuth ``a`` and elevation ``e`` (degrees) sits at
``radius * (sin a cos e, sin e, cos a cos e)`` and looks at the origin; azimuth 0 is the *front* view (the camera on
+z), so the world's +x is the image's right in the front view.

``VoxelGrid`` stores unconstrained fields on a (R, R, R) lattice spanning the cube: ``density_raw`` (1 channel) and
``rgb_raw`` (3). A point's density is ``softplus(trilinear(density_raw) + density_shift)`` (DVGO's post-interpolation
activation: the shift makes a zero-initialised grid almost empty) and is zero outside the cube; its colour is
``sigmoid(trilinear(rgb_raw))``. Trilinear interpolation is ``F.grid_sample`` on 5-D inputs with ``align_corners=True``
(the lattice's corner voxels sit on the cube's faces).

``render`` marches ``num_samples`` points per ray between ``near`` and ``far`` (stratified with a torch.Generator, or
at bin centres without one) and composites them with the emission-absorption model (NeRF's quadrature):
``alpha_i = 1 - exp(-sigma_i * delta_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``, ``C = sum_i T_i alpha_i c_i +
(1 - sum_i T_i alpha_i) * background``. Images are (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from rewardopt.scenes import Scene, view_dependent_prompt

#: where views count as front / side / back (azimuth, degrees from the front), and overhead (elevation)
FRONT_HALF_WIDTH, BACK_HALF_WIDTH, OVERHEAD_ELEVATION = 45.0, 45.0, 60.0


def view_name(azimuth: float, elevation: float = 0.0) -> str:
    """The view-dependent prompt suffix of DreamFusion / threestudio: "overhead", "front", "side" or "back"."""
    if elevation > OVERHEAD_ELEVATION:
        return "overhead"
    a = (azimuth + 180.0) % 360.0 - 180.0  # (-180, 180]
    if abs(a) <= FRONT_HALF_WIDTH:
        return "front"
    if abs(a) >= 180.0 - BACK_HALF_WIDTH:
        return "back"
    return "side"


def view_prompt(prompt: str, azimuth: float, elevation: float = 0.0) -> str:
    """``"<prompt>, <front|side|back|overhead> view"`` (``rewardopt.scenes.view_dependent_prompt``)."""
    return view_dependent_prompt(prompt, view_name(azimuth, elevation))


@dataclass
class Cameras:
    """A batch of orbit cameras looking at the origin. ``azimuth`` / ``elevation``: (B,) degrees."""

    azimuth: torch.Tensor
    elevation: torch.Tensor
    radius: float = 2.5
    fov: float = 40.0  # vertical field of view, degrees

    def __post_init__(self) -> None:
        self.azimuth = torch.as_tensor(self.azimuth, dtype=torch.float32).reshape(-1)
        self.elevation = torch.as_tensor(self.elevation, dtype=torch.float32).reshape(-1)
        if self.azimuth.shape != self.elevation.shape:
            raise ValueError(f"azimuth {tuple(self.azimuth.shape)} and elevation {tuple(self.elevation.shape)} differ")

    def __len__(self) -> int:
        return self.azimuth.numel()

    @classmethod
    def orbit(cls, n: int, elevation: float = 15.0, start: float = 0.0, **kwargs) -> "Cameras":
        """``n`` cameras evenly spaced in azimuth from ``start`` at one elevation (a turntable)."""
        az = start + torch.arange(n, dtype=torch.float32) * (360.0 / n)
        return cls(az, torch.full((n,), float(elevation)), **kwargs)

    @classmethod
    def random(cls, n: int, generator: torch.Generator | None = None,
               elevation_range: tuple[float, float] = (0.0, 30.0),
               **kwargs) -> "Cameras":
        """``n`` cameras with azimuth ~ U[0, 360) and elevation ~ U[elevation_range]."""
        u = torch.rand(2, n, generator=generator)
        lo, hi = elevation_range
        return cls(u[0] * 360.0, lo + u[1] * (hi - lo), **kwargs)

    def positions(self) -> torch.Tensor:
        """(B, 3) camera centres."""
        a, e = torch.deg2rad(self.azimuth), torch.deg2rad(self.elevation)
        return self.radius * torch.stack([torch.sin(a) * torch.cos(e), torch.sin(e), torch.cos(a) * torch.cos(e)], -1)

    def rays(self, height: int, width: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres: each (B, H, W, 3)."""
        origin = self.positions().to(device)
        forward = F.normalize(-origin, dim=-1)
        up_world = torch.tensor([0.0, 1.0, 0.0], device=origin.device).expand_as(forward)
        right = F.normalize(torch.cross(forward, up_world, dim=-1), dim=-1)
        up = torch.cross(right, forward, dim=-1)
        f = 0.5 * height / math.tan(math.radians(self.fov) / 2)
        ys = (torch.arange(height, device=origin.device, dtype=torch.float32) + 0.5 - height / 2) / f
        xs = (torch.arange(width, device=origin.device, dtype=torch.float32) + 0.5 - width / 2) / f
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # image row 0 is the top: up is -y in pixel rows
        d = (rearrange(gx, "h w -> 1 h w 1") * rearrange(right, "b c -> b 1 1 c")
             - rearrange(gy, "h w -> 1 h w 1") * rearrange(up, "b c -> b 1 1 c")
             + rearrange(forward, "b c -> b 1 1 c"))
        d = F.normalize(d, dim=-1)
        return repeat(origin, "b c -> b h w c", h=height, w=width), d


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0), stable for large y."""
    return torch.where(y > 20, y, torch.log(torch.expm1(y.clamp(min=1e-6))))


class VoxelGrid(nn.Module):
    """Density and colour on an (R, R, R) lattice over [-1, 1]^3, trilinearly interpolated.

    Args:
        resolution: R (e.g. 32-64).
        density_shift: added before the softplus; a zero grid then has density ``softplus(shift)``
            (-5: 0.0067 per unit length, nearly transparent).
        init_density: if given, the raw density starts so that the centre ball of radius 0.5 has this density (a
            blob, as threestudio initialises SDS scenes) and the rest is empty.
        generator: seeds the colour initialisation (small random values around grey).
    """

    def __init__(self, resolution: int = 32, density_shift: float = -5.0, init_density: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2, got {resolution}")
        self.resolution, self.density_shift = int(resolution), float(density_shift)
        r = self.resolution
        self.density_raw = nn.Parameter(torch.zeros(1, 1, r, r, r))
        self.rgb_raw = nn.Parameter(0.1 * torch.randn(1, 3, r, r, r, generator=generator))
        if init_density is not None:
            c = self.lattice()
            inside = (c.norm(dim=-1) < 0.5).float()
            raw = inverse_softplus(torch.tensor(float(init_density))) - self.density_shift
            with torch.no_grad():
                self.density_raw.copy_(rearrange(inside * raw, "d h w -> 1 1 d h w"))

    def lattice(self) -> torch.Tensor:
        """(R, R, R, 3) world coordinates (x, y, z) of the lattice points, indexed [z, y, x] (grid_sample's order)."""
        lin = torch.linspace(-1.0, 1.0, self.resolution)
        z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
        return torch.stack([x, y, z], -1)

    @classmethod
    def from_fields(cls, density: torch.Tensor, rgb: torch.Tensor, density_shift: float = -5.0) -> "VoxelGrid":
        """A grid whose lattice holds ``density`` (R, R, R) >= 0 and ``rgb`` (3, R, R, R) in (0, 1), both [z, y, x]."""
        r = density.shape[-1]
        if density.shape != (r, r, r) or rgb.shape != (3, r, r, r):
            raise ValueError(f"expected density (R, R, R) and rgb (3, R, R, R), got {tuple(density.shape)} and "
                             f"{tuple(rgb.shape)}")
        grid = cls(r, density_shift)
        with torch.no_grad():
            grid.density_raw.copy_(rearrange(inverse_softplus(density.clamp(min=1e-6)) - density_shift,
                                              "d h w -> 1 1 d h w"))
            grid.rgb_raw.copy_(torch.logit(rgb.clamp(1e-4, 1 - 1e-4)).unsqueeze(0))
        return grid

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (...,) and colour (..., 3) at world points (..., 3)."""
        lead = points.shape[:-1]
        flat = rearrange(points, "... c -> 1 (...) 1 1 c")
        raw = torch.cat([self.density_raw, self.rgb_raw], 1)
        v = F.grid_sample(raw, flat.to(raw.dtype), mode="bilinear", padding_mode="border", align_corners=True)
        v = rearrange(v, "1 c n 1 1 -> n c")
        inside = (points.abs() <= 1.0).all(-1).reshape(-1).to(v.dtype)
        sigma = F.softplus(v[:, 0] + self.density_shift) * inside
        rgb = torch.sigmoid(v[:, 1:])
        return sigma.reshape(lead), rgb.reshape(*lead, 3)

    def occupancy(self) -> torch.Tensor:
        """(R, R, R) lattice densities (for meshes and regularisers)."""
        return F.softplus(self.density_raw[0, 0] + self.density_shift)


def composite(sigma: torch.Tensor, rgb: torch.Tensor, deltas: torch.Tensor,
              background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Emission-absorption compositing along the last sample axis.

    ``sigma`` (..., S), ``rgb`` (..., S, 3), ``deltas`` (..., S), ``background`` broadcastable to (..., 3).
    Returns (colour (..., 3), opacity (...), weights (..., S))."""
    alpha = 1.0 - torch.exp(-sigma * deltas)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1] + 1e-10], -1), -1)
    weights = trans * alpha
    opacity = weights.sum(-1)
    colour = (weights.unsqueeze(-1) * rgb).sum(-2) + (1.0 - opacity).unsqueeze(-1) * background
    return colour, opacity, weights


def background_colours(n: int, background: str | Sequence[float], generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """(n, 3) background colours: a fixed RGB triple for every view, or "random" (uniform per view)."""
    if isinstance(background, str):
        if background != "random":
            raise ValueError(f"background must be an RGB triple or 'random', got {background!r}")
        return torch.rand(n, 3, generator=generator)
    bg = torch.as_tensor([float(c) for c in background])
    if bg.shape != (3,):
        raise ValueError(f"background must have 3 components, got {list(background)}")
    return bg.expand(n, 3)


def render(scene: VoxelGrid, cameras: Cameras, height: int = 32, width: int = 32, num_samples: int = 64,
           background: str | Sequence[float] = (1.0, 1.0, 1.0), generator: torch.Generator | None = None,
           near: float | None = None, far: float | None = None, return_opacity: bool = False):
    """Render ``scene`` from each camera: (B, 3, H, W) in [0, 1] (and (B, 1, H, W) opacity with ``return_opacity``).

    ``near`` / ``far`` default to the camera radius -/+ sqrt(3) (the cube's bounding sphere); ``generator`` jitters
    the samples inside their bins (stratified sampling, for training) and draws random backgrounds."""
    device = scene.density_raw.device
    near = cameras.radius - math.sqrt(3) if near is None else near
    far = cameras.radius + math.sqrt(3) if far is None else far
    origins, dirs = cameras.rays(height, width, device)
    b = len(cameras)
    edges = torch.linspace(near, far, num_samples + 1, device=device)
    if generator is not None:
        u = torch.rand(b, height, width, num_samples, generator=generator).to(device)
    else:
        u = torch.full((b, height, width, num_samples), 0.5, device=device)
    t = edges[:-1] + (edges[1:] - edges[:-1]) * u  # (B, H, W, S)
    deltas = torch.cat([t[..., 1:] - t[..., :-1], (far - t[..., -1:]).clamp(min=1e-3)], -1)
    points = origins.unsqueeze(-2) + t.unsqueeze(-1) * dirs.unsqueeze(-2)
    sigma, rgb = scene.query(points)
    bg = rearrange(background_colours(b, background, generator).to(device), "b c -> b 1 1 c")
    colour, opacity, _ = composite(sigma, rgb, deltas, bg)
    images = rearrange(colour, "b h w c -> b c h w").clamp(0, 1)
    if return_opacity:
        return images, rearrange(opacity, "b h w -> b 1 h w")
    return images


# ----------------------------------------------------------------------------- outputs you can look at
@torch.no_grad()
def turntable_frames(scene: VoxelGrid, frames: int = 24, elevation: float = 15.0, size: int = 64,
                     num_samples: int = 96, background: Sequence[float] = (1.0, 1.0, 1.0), **camera_kwargs
                     ) -> torch.Tensor:
    """(frames, 3, size, size) renders around the object (the front view first)."""
    cams = Cameras.orbit(frames, elevation=elevation, **camera_kwargs)
    return render(scene, cams, size, size, num_samples, background)


def save_turntable(scene: VoxelGrid, path: str | Path, frames: int = 24, **kwargs) -> Path:
    """A turntable GIF of ``scene`` (``turntable_frames`` arguments; ``rewardopt.media.save_gif``, 2x upscaled)."""
    from rewardopt.media import save_gif

    return save_gif(turntable_frames(scene, frames, **kwargs), path, fps=12, scale=2)


def export_mesh(scene: VoxelGrid, path: str | Path, level: float = 5.0) -> Path:
    """The density's ``level`` iso-surface as a Wavefront OBJ with per-vertex colours (marching cubes from
    scikit-image: ``pip install scikit-image``)."""
    try:
        from skimage.measure import marching_cubes
    except ImportError as e:
        raise ImportError("export_mesh needs scikit-image (pip install scikit-image)") from e
    with torch.no_grad():
        dens = scene.occupancy().cpu().numpy()
        if not (dens.min() < level < dens.max()):
            raise ValueError(f"level {level} is outside the grid's density range [{dens.min():.3g}, {dens.max():.3g}]")
        verts, faces, _, _ = marching_cubes(dens, level)  # verts in (z, y, x) lattice units
        r = scene.resolution
        xyz = torch.as_tensor(verts[:, ::-1].copy(), dtype=torch.float32) / (r - 1) * 2 - 1
        _, rgb = scene.query(xyz)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"v {x:.5f} {y:.5f} {z:.5f} {c[0]:.4f} {c[1]:.4f} {c[2]:.4f}"
             for (x, y, z), c in zip(xyz.tolist(), rgb.tolist())]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- the scene score distillation trains
class VoxelScene(Scene):
    """A ``VoxelGrid`` seen by orbit cameras: what ``rewardopt.methods.sds`` optimises in the text-to-3D domain.

    Args:
        resolution: the grid's R (32-64). init_density: the starting blob's density (None: an empty grid).
        render_size: training/evaluation render size (square). num_samples: points per ray.
        elevation_range: training cameras' elevation, degrees (azimuth is uniform over 360).
        radius, fov: the orbit cameras'. background: an RGB triple or "random" (per training view; evaluation
            renders use ``eval_background``).
        seed: seeds the grid's colour initialisation.
    """

    def __init__(self, resolution: int = 32, init_density: float | None = 10.0, render_size: int = 32,
                 num_samples: int = 64, elevation_range: tuple[float, float] = (0.0, 30.0), radius: float = 2.5,
                 fov: float = 40.0, background: str | Sequence[float] = (1.0, 1.0, 1.0),
                 eval_background: Sequence[float] = (1.0, 1.0, 1.0), eval_elevation: float = 15.0,
                 density_shift: float = -5.0, seed: int = 0) -> None:
        super().__init__()
        self.grid = VoxelGrid(resolution, density_shift, init_density, torch.Generator().manual_seed(seed))
        self.render_size, self.num_samples = int(render_size), int(num_samples)
        self.elevation_range = (float(elevation_range[0]), float(elevation_range[1]))
        self.radius, self.fov = float(radius), float(fov)
        background_colours(1, background)  # validate now, not mid-run
        self.background = background if isinstance(background, str) else tuple(float(c) for c in background)
        self.eval_background = tuple(float(c) for c in eval_background)
        self.eval_elevation = float(eval_elevation)

    def random_views(self, n: int, generator: torch.Generator | None = None) -> Cameras:
        return Cameras.random(n, generator, self.elevation_range, radius=self.radius, fov=self.fov)

    def render(self, views: Cameras, generator: torch.Generator | None = None) -> torch.Tensor:
        bg = self.background if generator is not None else self.eval_background
        return render(self.grid, views, self.render_size, self.render_size, self.num_samples, bg, generator)

    def view_names(self, views: Cameras) -> list[str]:
        return [view_name(float(a), float(e)) for a, e in zip(views.azimuth, views.elevation)]

    def evaluation_views(self, n: int) -> Cameras:
        return Cameras.orbit(n, elevation=self.eval_elevation, radius=self.radius, fov=self.fov)

    def save_turntable(self, path: str | Path, frames: int = 24, size: int = 64) -> Path:
        return save_turntable(self.grid, path, frames, elevation=self.eval_elevation, size=size,
                              background=self.eval_background, radius=self.radius, fov=self.fov)
