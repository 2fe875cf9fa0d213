"""The differentiable scene: rays, trilinear sampling and compositing against an independent ray marcher; gradients;
a grid fitted to ground-truth renders reproduces held-out views; objects and their prompts."""

from __future__ import annotations

import math

import pytest
import torch

from domains.text_to_3d.objects import PROMPTS, canonical, ground_truth_scene, parse_prompt, render_views, voxelize
from domains.text_to_3d.scene import (
    Cameras,
    VoxelGrid,
    VoxelScene,
    composite,
    export_mesh,
    render,
    save_turntable,
    view_name,
    view_prompt,
)


def reference_render_pixel(density, rgb, az, el, radius, fov, height, width, row, col, num_samples, background,
                           shift):
    """One pixel by an explicit loop: camera basis from az/el, the ray through the pixel centre, trilinear
    interpolation by its 8 corners, softplus/sigmoid activations, front-to-back compositing."""
    a, e = math.radians(az), math.radians(el)
    cam = [radius * math.sin(a) * math.cos(e), radius * math.sin(e), radius * math.cos(a) * math.cos(e)]
    norm = lambda v: [c / math.sqrt(sum(x * x for x in v)) for c in v]  # noqa: E731
    fwd = norm([-c for c in cam])
    right = norm([fwd[1] * 0 - fwd[2] * 1, fwd[2] * 0 - fwd[0] * 0, fwd[0] * 1 - fwd[1] * 0])  # fwd x (0, 1, 0)
    up = [right[1] * fwd[2] - right[2] * fwd[1], right[2] * fwd[0] - right[0] * fwd[2],
          right[0] * fwd[1] - right[1] * fwd[0]]  # right x fwd
    f = 0.5 * height / math.tan(math.radians(fov) / 2)
    u, v = (col + 0.5 - width / 2) / f, (row + 0.5 - height / 2) / f
    d = norm([u * right[i] - v * up[i] + fwd[i] for i in range(3)])
    r = density.shape[0]
    near, far = radius - math.sqrt(3), radius + math.sqrt(3)
    step = (far - near) / num_samples
    colour, trans = [0.0, 0.0, 0.0], 1.0
    for k in range(num_samples):
        t = near + (k + 0.5) * step
        p = [cam[i] + t * d[i] for i in range(3)]
        delta = step if k < num_samples - 1 else far - t
        if any(abs(c) > 1 for c in p):
            continue
        g = [min(max((c + 1) / 2 * (r - 1), 0.0), r - 1.0) for c in p]  # x, y, z in lattice units
        i0 = [min(int(math.floor(c)), r - 2) for c in g]
        fr = [g[i] - i0[i] for i in range(3)]
        raw_d, raw_c = 0.0, [0.0, 0.0, 0.0]
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    wgt = (fr[0] if dx else 1 - fr[0]) * (fr[1] if dy else 1 - fr[1]) * (fr[2] if dz else 1 - fr[2])
                    z, y, x = i0[2] + dz, i0[1] + dy, i0[0] + dx
                    raw_d += wgt * float(density[z, y, x])
                    for c in range(3):
                        raw_c[c] += wgt * float(rgb[c, z, y, x])
        sigma = math.log1p(math.exp(raw_d + shift))
        alpha = 1 - math.exp(-sigma * delta)
        for c in range(3):
            colour[c] += trans * alpha / (1 + math.exp(-raw_c[c]))
        trans *= 1 - alpha
    return [colour[c] + trans * background[c] for c in range(3)]


def test_render_matches_an_independent_ray_marcher():
    torch.manual_seed(0)
    grid = VoxelGrid(5, density_shift=-1.0)
    with torch.no_grad():
        grid.density_raw.normal_(0, 2)
        grid.rgb_raw.normal_(0, 1)
    cams = Cameras(torch.tensor([0.0, 70.0, 200.0]), torch.tensor([10.0, 35.0, -5.0]), radius=2.5, fov=40.0)
    h, w, s, bg = 6, 5, 24, (0.2, 0.5, 0.9)
    img = render(grid, cams, h, w, s, bg)
    dens, rgb = grid.density_raw[0, 0].detach(), grid.rgb_raw[0].detach()
    for b, (az, el) in enumerate(zip(cams.azimuth.tolist(), cams.elevation.tolist())):
        for row, col in [(0, 0), (2, 3), (3, 2), (5, 4)]:
            ref = reference_render_pixel(dens, rgb, az, el, 2.5, 40.0, h, w, row, col, s, bg, -1.0)
            assert img[b, :, row, col].tolist() == pytest.approx(ref, abs=1e-5)


def test_render_is_differentiable_in_the_grid():
    torch.manual_seed(1)
    grid = VoxelGrid(4, density_shift=0.0).double()
    with torch.no_grad():
        grid.density_raw.normal_(0, 1)
    cams = Cameras(torch.tensor([30.0]), torch.tensor([20.0]), radius=2.5)

    d0 = grid.density_raw.detach().clone().requires_grad_(True)
    c0 = grid.rgb_raw.detach().clone().requires_grad_(True)
    images = render(grid, cams, 3, 3, 8, (1.0, 1.0, 1.0))
    images.sum().backward()
    assert grid.density_raw.grad.abs().sum() > 0 and grid.rgb_raw.grad.abs().sum() > 0
    del grid.density_raw, grid.rgb_raw  # the fields become plain tensors, the inputs of gradcheck

    def f(dens, col):
        grid.density_raw, grid.rgb_raw = dens, col
        return render(grid, cams, 3, 3, 8, (1.0, 1.0, 1.0))

    assert torch.autograd.gradcheck(f, (d0, c0), eps=1e-6, atol=1e-5)


def test_composite_conserves_light():
    sigma = torch.tensor([[0.0, 1e4, 5.0]])
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    colour, opacity, weights = composite(sigma, rgb, torch.full((1, 3), 0.1), torch.tensor([0.0, 0.0, 0.0]))
    assert opacity.item() == pytest.approx(1.0, abs=1e-6)  # the opaque second sample hides the third
    assert colour[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    empty, op, _ = composite(torch.zeros(1, 3), rgb, torch.full((1, 3), 0.1), torch.tensor([0.3, 0.4, 0.5]))
    assert op.item() == 0 and empty[0].tolist() == pytest.approx([0.3, 0.4, 0.5])


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_a_grid_fitted_to_ground_truth_renders_reproduces_held_out_views():
    """The renderer can represent the objects: fit a 32^3 grid directly to 24 ground-truth renders of a stacked
    pair and check held-out views (other azimuths and elevations)."""
    torch.manual_seed(0)
    prompt = PROMPTS[14]
    train = Cameras.random(24, torch.Generator().manual_seed(0), (0.0, 30.0))
    held = Cameras(torch.tensor([17.0, 133.0, 251.0, 322.0]), torch.tensor([5.0, 25.0, 12.0, 28.0]))
    target, held_target = render_views(prompt, train, 32, 48), render_views(prompt, held, 32, 48)
    scene = VoxelScene(resolution=32, init_density=None, num_samples=48)
    opt = torch.optim.Adam(scene.parameters(), lr=0.1)
    rng = torch.Generator().manual_seed(1)
    for step in range(150):
        idx = torch.randint(0, 24, (6,), generator=rng)
        cams = Cameras(train.azimuth[idx], train.elevation[idx])
        loss = ((render(scene.grid, cams, 32, 32, 48, (1.0, 1.0, 1.0)) - target[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_psnr = psnr(render(scene.grid, held, 32, 32, 48, (1.0, 1.0, 1.0)), held_target)
    blank = psnr(torch.ones_like(held_target), held_target)
    assert held_psnr > 25.0 and held_psnr > blank + 10, (held_psnr, blank)


def test_views_and_prompts():
    assert view_name(0) == "front" and view_name(180) == "back" and view_name(90) == view_name(-90) == "side"
    assert view_name(10, 75) == "overhead" and view_name(-30) == "front" and view_name(200) == "back"
    assert view_prompt("a red cube", 170.0) == "a red cube, back view"
    assert len(PROMPTS) == len(set(PROMPTS)) == 36
    assert parse_prompt("a blue cone on a red cube, side view") == ("stack", [("red", "cube"), ("blue", "cone")])
    assert parse_prompt(PROMPTS[24])[0] == "pair"
    for bad in ("a purple cube", "two red cubes", "a red cube beside a blue cone"):
        with pytest.raises(ValueError):
            canonical(bad)


def test_pairs_are_mirrored_from_behind():
    """A pair's back view shows the parts swapped: what makes a scene's views disagree if it is not 3D-consistent."""
    prompt = PROMPTS[24]  # "<left> and <right>" in the front view
    front, back = render_views(prompt, Cameras(torch.tensor([0.0, 180.0]), torch.tensor([0.0, 0.0])), 32, 48)
    assert psnr(back, front) < 20  # different pictures
    assert psnr(back, torch.flip(front, dims=[-1])) > psnr(back, front) + 5  # the mirror image, up to shading


def test_handedness_left_right_and_up_in_the_image():
    """The renderer's image axes: from the front (azimuth 0, the camera on +z) world +x is image right and +y image
    up; from behind (180) +x is image left. A mirrored renderer would still pass the test above, not this one."""
    prompt = PROMPTS[24]
    assert prompt == "a green cube and a red cone"  # the green cube at x = -0.45 (left), the red cone at +0.45
    front, back = render_views(prompt, Cameras(torch.tensor([0.0, 180.0]), torch.tensor([0.0, 0.0])), 32, 48)
    w = front.shape[-1] // 2

    def greener(img):  # green minus red, per image half
        return float((img[1] - img[0])[:, :w].mean()), float((img[1] - img[0])[:, w:].mean())

    left, right = greener(front)
    assert left > 0.1 and right < -0.1  # green on the left, red on the right
    left, right = greener(back)
    assert left < -0.1 and right > 0.1
    stack = render_views("a blue cone on a red cube", Cameras(torch.tensor([0.0]), torch.tensor([0.0])), 32, 48)[0]
    h = stack.shape[-2] // 2
    blueness = stack[2] - stack[0]
    assert float(blueness[:h].mean()) > 0.05 > float(blueness[h:].mean())  # the cone (on top) is in the upper half


def test_voxelize_puts_density_inside_the_parts():
    spec = canonical("a red sphere")
    dens, rgb = voxelize(spec, 17)
    assert dens[8, 8, 8] > 30 and dens[0, 0, 0] < 1e-3  # centre inside, corner outside
    assert rgb[0, 8, 8, 8] > rgb[1, 8, 8, 8]  # red


def test_turntable_gif_and_errors(tmp_path):
    from PIL import Image

    path = save_turntable(ground_truth_scene("a green cone", 24), tmp_path / "t.gif", frames=6, size=24, num_samples=24)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.size == (48, 48)
    with pytest.raises(ValueError, match="RGB triple or 'random'"):
        VoxelScene(background="white")
    with pytest.raises(ValueError, match="differ"):
        Cameras(torch.zeros(2), torch.zeros(3))


def test_export_mesh_needs_scikit_image_or_writes_obj(tmp_path):
    grid = ground_truth_scene("a red cube", 24)
    try:
        import skimage  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="scikit-image"):
            export_mesh(grid, tmp_path / "m.obj")
        return
    text = export_mesh(grid, tmp_path / "m.obj").read_text()
    assert text.count("\nf ") > 100


def test_render_bank_visual_prompts_come_from_the_whole_front_cone():
    """The prior's image branch and the feature net learn from ``front`` references seen from anywhere a view is
    called "front" (as a text-to-image sample of "<prompt>, front view" is), not from one fixed camera; the
    training views themselves do not depend on that choice."""
    from domains.text_to_3d.objects import front_cone_cameras, render_bank

    args = dict(prompts=[PROMPTS[24]], instances=1, views=4, size=16, seed=0, num_samples=16, resolution=16)
    cone, fixed = render_bank(**args), render_bank(**args, front_cone=False)
    assert torch.equal(cone["images"], fixed["images"])
    assert all(torch.equal(fixed["front"][0], f) for f in fixed["front"])  # one camera
    assert not all(torch.equal(cone["front"][0], f) for f in cone["front"])  # several cameras
    cams = front_cone_cameras(1000, torch.Generator().manual_seed(0))
    assert all(view_name(float(a), float(e)) == "front" for a, e in zip(cams.azimuth, cams.elevation))
    assert float(cams.azimuth.min()) < -40 and float(cams.azimuth.max()) > 40
