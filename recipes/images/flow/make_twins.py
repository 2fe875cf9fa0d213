"""Write the flow twin of every tiny text-to-image recipe: the same job on ``embedded:tiny-shapes-flow``.

A twin is its source recipe with only the generator swapped: ``StableDiffusionGenerator`` over the DDIM tiny model
becomes ``FlowUNetGenerator`` over the tiny rectified flow (the same UNet and text encoder trained with the flow
objective), ``sampler`` and ``eta`` go, and a stochastic DDIM (eta > 0, what DDPO, VARD and the search methods need)
becomes Flow-GRPO's marginal-preserving SDE (``sde_noise_level: 0.7``, the paper's); steps, guidance, LoRA, the
method and its reward stay. Output folders get a ``_flow`` suffix. ``tests/images/test_flow_twins.py`` checks that
every tiny recipe has an up-to-date twin, so edit the source recipe and re-run:

    python recipes/images/flow/make_twins.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES = HERE.parent
SDE_NOISE_LEVEL = 0.7
#: twins run in the default suite (the issue's named ones); the rest are ``slow`` (make test-all)
DEFAULT_SUITE = {"draft_lv_tiny", "svdd_classifier_tiny", "free2guide_classifier_tiny"}
WEIGHTS = "domains/images/assets/tiny_shapes_flow/unet"


def sources() -> list[Path]:
    """The tiny recipes that sample from the tiny text-to-image model."""
    out = []
    for p in sorted(IMAGES.glob("*_tiny.yaml")) + sorted((IMAGES / "steer").glob("*_tiny.yaml")):
        if "domains.images.stable_diffusion.StableDiffusionGenerator" in p.read_text():
            out.append(p)
    return out


def twin_path(source: Path) -> Path:
    rel = source.relative_to(IMAGES)
    return HERE / rel.parent / f"{source.stem.removesuffix('_tiny')}_flow_tiny.yaml"


def twin_text(source: Path) -> str:
    """The twin's YAML text (comments kept)."""
    text = source.read_text()
    rel = source.relative_to(IMAGES.parent.parent)
    eta = re.search(r"^\s*eta:\s*([0-9.]+)", text, flags=re.M)
    stochastic = eta is not None and float(eta.group(1)) > 0
    lines, out = text.splitlines(), []
    header_done, skipping = False, False
    for line in lines:
        if not header_done and not line.startswith("#"):
            header_done = True
        if not header_done:
            if skipping and re.match(r"#\s{3,}\S", line) and not re.match(r"#\s*[A-Z][a-z]+:", line):
                continue  # a continuation of the source's Expected: figures
            skipping = False
            if re.match(r"#\s*Expected:", line):
                line = ("# Expected: the source's figures were measured on the DDIM model; for the flow model see "
                        "benchmarks/results/flow.md.")
                skipping = True
            elif re.match(r"#\s*Test:", line):
                spec = line.split(":", 1)[1].strip()
                if spec.startswith("skip"):
                    line = f"# Test:     {spec} (and its flow twin's)"
                else:  # [slow] fit N | predict, then needs PATH (HINT), then the source's --key=value overrides
                    words = spec.split()
                    if words[0] == "slow":
                        words = words[1:]
                    head = words[:2] if words[0] == "fit" else words[:1]
                    slow = "" if source.stem in DEFAULT_SUITE else "slow "
                    line = (f"# Test:     {slow}{' '.join(head)} needs {WEIGHTS} (make pretrain-tiny)"
                            + "".join(f" {w}" for w in words[len(head):]))
            elif re.match(r"#\s*Launch:", line):
                line = line.replace(str(rel), str(twin_path(source).relative_to(IMAGES.parent.parent)))
            out.append(re.sub(r"(runs/(?:steer/)?)([A-Za-z0-9_]+?)_tiny\b", r"\1\2_flow_tiny", line))
            continue
        if "class_path: domains.images.stable_diffusion.StableDiffusionGenerator" in line:
            line = line.replace("StableDiffusionGenerator", "FlowUNetGenerator")
        elif re.match(r"^\s*pretrained:\s*embedded:tiny-shapes\b", line):
            line = line.replace("embedded:tiny-shapes", "embedded:tiny-shapes-flow", 1)
        elif re.match(r"^\s*sampler:", line):
            continue
        elif re.match(r"^\s*eta:", line):
            indent = line[: len(line) - len(line.lstrip())]
            if stochastic:
                line = (f"{indent}sde_noise_level: {SDE_NOISE_LEVEL}   # Flow-GRPO's marginal-preserving SDE "
                        f"(the source's stochastic DDIM, eta {eta.group(1)})")
            else:
                line = f"{indent}sde_noise_level: 0.0   # the deterministic Euler ODE (the source's DDIM eta 0)"
        line = re.sub(r"(runs/(?:steer/)?)([A-Za-z0-9_]+?)_tiny\b", r"\1\2_flow_tiny", line)
        line = re.sub(r"(name:\s*)([A-Za-z0-9_]+?)_tiny\b", r"\1\2_flow_tiny", line)
        out.append(line)
    intro = [f"# Flow twin of {rel} (written by recipes/images/flow/make_twins.py: edit the source and re-run):",
             "# the same job on embedded:tiny-shapes-flow, a rectified flow sampled with Euler ODE steps"
             + (" and Flow-GRPO's SDE." if stochastic else "."), "#"]
    return "\n".join(intro + out) + "\n"


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for src in sources():
        target, text = twin_path(src), twin_text(src)
        if check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target.relative_to(IMAGES.parent.parent)}")
    if stale:
        print("stale flow twins (run python recipes/images/flow/make_twins.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
