"""Procedural 3D objects the tiny text-to-3D default learns from: coloured spheres, cubes and cones, alone, stacked
("a red cube on a blue sphere") or side by side ("a red cone and a blue cube": the first on the left in the front
view, so the back view shows them swapped and a scene must be consistent across views to match both).

Each prompt has one *canonical* object (``canonical``), the ground truth the benchmark compares against; training
data are *jittered* instances (``jitter``: size x U[0.9, 1.1], offsets of ±0.05, colour ±0.05) seen from random views.
``voxelize`` turns an object into density / colour fields on a lattice: occupancy is a sigmoid of each part's signed
distance (soft edges, ``SOFTNESS``) times ``DENSITY``; colour is the nearest part's, with a Lambertian shade from a
fixed light baked in (view-independent, so a voxel grid can hold it exactly; it gives the renders 3D cues). Ground-truth
renders are those fields rendered by ``scene.render`` — the same renderer a scene is optimised with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from domains.text_to_3d.scene import FRONT_HALF_WIDTH, Cameras, VoxelGrid, render, view_prompt

SHAPES = ("sphere", "cube", "cone")
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.2, 0.3, 0.85), "yellow": (0.9, 0.8, 0.2)}
LAYOUTS = ("single", "stack", "pair")
BACKGROUND = (1.0, 1.0, 1.0)
DENSITY, SOFTNESS = 40.0, 0.02
LIGHT = (0.4, 0.8, 0.6)  # baked light direction (from the front, above, right)
GT_RESOLUTION = 64
#: the visual prompt's camera (VP3D's "text-to-image first" image is a front view)
FRONT_AZIMUTH, FRONT_ELEVATION = 0.0, 15.0


@dataclass(frozen=True)
class Part:
    shape: str
    colour: tuple[float, float, float]
    centre: tuple[float, float, float]
    size: float  # the half-extent


@dataclass(frozen=True)
class ObjectSpec:
    prompt: str
    parts: tuple[Part, ...] = field(default_factory=tuple)


def _phrase(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def all_prompts() -> list[str]:
    """The 36 prompts of the tiny world, in a fixed order: 12 single objects, 12 stacks, 12 pairs."""
    singles = [_phrase(c, s) for s in SHAPES for c in COLOURS]
    rng = random.Random(3)
    combos = [(c1, s1, c2, s2) for s1 in SHAPES for s2 in SHAPES for c1 in COLOURS for c2 in COLOURS if c1 != c2]
    rng.shuffle(combos)
    stacks = [f"{_phrase(c2, s2)} on {_phrase(c1, s1)}" for c1, s1, c2, s2 in combos[:12]]
    pairs = [f"{_phrase(c1, s1)} and {_phrase(c2, s2)}" for c1, s1, c2, s2 in combos[12:24]]
    return singles + stacks + pairs


PROMPTS = all_prompts()


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """(layout, [(colour, shape), ...]) of a prompt of the tiny world; a view suffix (", front view") is ignored.
    For a stack the list is (bottom, top); for a pair (left, right) in the front view."""
    words = prompt.split(",")[0].split()
    if len(words) == 3 and words[0] == "a":
        return "single", [(words[1], words[2])]
    if len(words) == 7 and words[0] == words[4] == "a" and words[3] in ("on", "and"):
        first, second = (words[1], words[2]), (words[5], words[6])
        if words[3] == "on":  # "<top> on <bottom>"
            return "stack", [second, first]
        return "pair", [first, second]
    raise ValueError(f"not a prompt of the tiny 3D world: {prompt!r} (e.g. {PROMPTS[0]!r}, {PROMPTS[12]!r}, "
                     f"{PROMPTS[24]!r})")


def canonical(prompt: str) -> ObjectSpec:
    """The ground-truth object a prompt describes."""
    layout, parts = parse_prompt(prompt)
    for colour, shape in parts:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown colour or shape in {prompt!r}: colours {list(COLOURS)}, shapes {list(SHAPES)}")
    if layout == "single":
        places = [((0.0, 0.0, 0.0), 0.5)]
    elif layout == "stack":
        places = [((0.0, -0.35, 0.0), 0.35), ((0.0, 0.33, 0.0), 0.3)]
    else:
        places = [((-0.45, 0.0, 0.0), 0.35), ((0.45, 0.0, 0.0), 0.35)]
    return ObjectSpec(prompt, tuple(Part(s, COLOURS[c], centre, size) for (c, s), (centre, size) in zip(parts, places)))


def jitter(spec: ObjectSpec, rng: random.Random) -> ObjectSpec:
    """A random instance of ``spec``: each part's size x U[0.9, 1.1], centre ±0.05 per axis, colour ±0.05."""
    parts = []
    for p in spec.parts:
        centre = tuple(c + rng.uniform(-0.05, 0.05) for c in p.centre)
        colour = tuple(min(max(c + rng.uniform(-0.05, 0.05), 0.0), 1.0) for c in p.colour)
        parts.append(replace(p, centre=centre, colour=colour, size=p.size * rng.uniform(0.9, 1.1)))
    return replace(spec, parts=tuple(parts))


def signed_distance(part: Part, points: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside; exact for the sphere and cube, a bound for the cone) at points (..., 3)."""
    q = points - torch.tensor(part.centre, dtype=points.dtype)
    s = part.size
    if part.shape == "sphere":
        return q.norm(dim=-1) - s
    if part.shape == "cube":
        d = q.abs() - 0.85 * s
        return d.clamp(min=0).norm(dim=-1) + d.max(-1).values.clamp(max=0)
    if part.shape == "cone":  # apex up, base radius s, height 2s, centred on the part's centre
        radial = q[..., [0, 2]].norm(dim=-1)
        height = 2 * s
        r_at = s * (s - q[..., 1]) / height  # the cone's radius at this height
        side = (radial - r_at) * (height / (height ** 2 + s ** 2) ** 0.5)
        return torch.maximum(side, q[..., 1].abs() - s)
    raise ValueError(f"unknown shape {part.shape!r}; known: {list(SHAPES)}")


def voxelize(spec: ObjectSpec, resolution: int = GT_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(density (R, R, R), rgb (3, R, R, R)) on the lattice of a ``VoxelGrid`` of this resolution."""
    pts = VoxelGrid(resolution).lattice()
    pts.requires_grad_(True)
    with torch.enable_grad():
        sdf = torch.stack([signed_distance(p, pts) for p in spec.parts])  # (P, R, R, R)
        nearest = sdf.min(0)
        normal = torch.autograd.grad(nearest.values.sum(), pts)[0]
    normal = F.normalize(normal, dim=-1)
    occupancy = torch.sigmoid(-nearest.values.detach() / SOFTNESS)
    colours = torch.tensor([p.colour for p in spec.parts])[nearest.indices]  # (R, R, R, 3)
    light = F.normalize(torch.tensor(LIGHT), dim=0)
    shade = 0.55 + 0.45 * (normal * light).sum(-1).clamp(min=0)
    rgb = (colours * shade.unsqueeze(-1)).clamp(0, 1)
    return DENSITY * occupancy, rgb.permute(3, 0, 1, 2).contiguous()


def ground_truth_scene(spec: ObjectSpec | str, resolution: int = GT_RESOLUTION) -> VoxelGrid:
    """The object (or a prompt's canonical object) as a voxel grid."""
    spec = canonical(spec) if isinstance(spec, str) else spec
    return VoxelGrid.from_fields(*voxelize(spec, resolution))


@torch.no_grad()
def render_views(spec: ObjectSpec | str, cameras: Cameras, size: int = 32, num_samples: int = 64,
                 resolution: int = GT_RESOLUTION) -> torch.Tensor:
    """Ground-truth renders (B, 3, size, size) of an object from ``cameras`` on the white background."""
    return render(ground_truth_scene(spec, resolution), cameras, size, size, num_samples, BACKGROUND)


def front_camera(**kwargs) -> Cameras:
    return Cameras(torch.tensor([FRONT_AZIMUTH]), torch.tensor([FRONT_ELEVATION]), **kwargs)


def front_cone_cameras(n: int, generator: torch.Generator, half_width: float = FRONT_HALF_WIDTH,
                       elevation_range: tuple[float, float] = (0.0, 30.0), **kwargs) -> Cameras:
    """``n`` cameras anywhere a view is called "front" (azimuth ~ U[-half_width, half_width], elevation ~
    U[elevation_range]): where a text-to-image sample of "<prompt>, front view" may be seen from, so a visual
    prompt drawn by text-to-image first matches the references the image branch was trained on."""
    u = torch.rand(2, n, generator=generator)
    lo, hi = elevation_range
    return Cameras((2 * u[0] - 1) * half_width, lo + u[1] * (hi - lo), **kwargs)


@torch.no_grad()
def render_bank(prompts: list[str] | None = None, instances: int = 16, views: int = 24, size: int = 32,
                seed: int = 0, elevation_range: tuple[float, float] = (0.0, 30.0), num_samples: int = 64,
                resolution: int = 48, front_cone: bool = True) -> dict:
    """Multi-view renders of jittered instances, for the prior's pretraining and the classifiers.

    Returns a dict of tensors: ``images`` (N, 3, size, size) uint8, ``front`` (N, 3, size, size) uint8 (a front view
    of the same instance: the visual prompt; with ``front_cone`` one per view from a camera anywhere in the front cone,
    ``front_cone_cameras``, drawn by its own generator so ``images`` do not depend on it; else the fixed
    ``front_camera``), ``label`` (N,) the prompt index in ``prompts``, ``instance`` (N,) a global
    instance id, ``azimuth`` / ``elevation`` (N,) degrees; and ``prompts`` (the list). N = len(prompts) * instances *
    views. Deterministic in ``seed``."""
    prompts = list(PROMPTS if prompts is None else prompts)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    front_gen = torch.Generator().manual_seed(seed + 7919)
    out = {k: [] for k in ("images", "front", "label", "instance", "azimuth", "elevation")}
    for li, prompt in enumerate(prompts):
        base = canonical(prompt)
        for k in range(instances):
            grid = VoxelGrid.from_fields(*voxelize(jitter(base, rng), resolution))
            cams = Cameras.random(views, gen, elevation_range)
            imgs = render(grid, cams, size, size, num_samples, BACKGROUND)
            if front_cone:
                front = render(grid, front_cone_cameras(views, front_gen, elevation_range=elevation_range), size, size,
                               num_samples, BACKGROUND)
            else:
                front = render(grid, front_camera(), size, size, num_samples, BACKGROUND).expand(views, -1, -1, -1)
            out["images"].append(imgs)
            out["front"].append(front)
            out["label"].append(torch.full((views,), li))
            out["instance"].append(torch.full((views,), li * instances + k))
            out["azimuth"].append(cams.azimuth)
            out["elevation"].append(cams.elevation)
    bank = {k: torch.cat(v) for k, v in out.items()}
    for k in ("images", "front"):
        bank[k] = (bank[k] * 255).round().to(torch.uint8)
    bank["prompts"] = prompts
    return bank


class Renders(torch.utils.data.Dataset):
    """A ``render_bank``'s renders: ``image`` and ``front`` (its instance's front view) float (3, H, W) in [0, 1],
    ``label``, ``instance``."""

    def __init__(self, bank: dict) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank["label"])

    def __getitem__(self, i: int) -> dict:
        b = self.bank
        return {"image": b["images"][i].float() / 255, "front": b["front"][i].float() / 255,
                "label": int(b["label"][i]), "instance": int(b["instance"][i])}


class MultiViewDataset(Renders):
    """``Renders`` items with the view's camera and prompts: ``prompt`` (view-suffixed, "a red cube, side view"),
    ``base_prompt``, ``azimuth``, ``elevation``."""

    def __getitem__(self, i: int) -> dict:
        b = self.bank
        base = b["prompts"][int(b["label"][i])]
        az, el = float(b["azimuth"][i]), float(b["elevation"][i])
        return {**super().__getitem__(i), "prompt": view_prompt(base, az, el), "base_prompt": base,
                "azimuth": az, "elevation": el}
