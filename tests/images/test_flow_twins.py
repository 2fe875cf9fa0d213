"""Every tiny text-to-image recipe has an up-to-date flow twin (recipes/images/flow/make_twins.py) that differs from
it only in the generator; the twins themselves run through the CLI in tests/test_recipes.py (their `# Test:` lines)."""

from __future__ import annotations

import importlib.util

import yaml

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("make_twins", ROOT / "recipes/images/flow/make_twins.py")
make_twins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_twins)


def strip_runs(obj):
    """The config with output folders normalised (twins write to *_flow_tiny)."""
    if isinstance(obj, dict):
        return {k: strip_runs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip_runs(v) for v in obj]
    if isinstance(obj, str):
        return obj.replace("_flow_tiny", "_tiny")
    return obj


def generator_blocks(cfg):
    """(path, init_args) of every generator in a config, and the config with them removed."""
    found = []

    def walk(o, path):
        if isinstance(o, dict):
            if str(o.get("class_path", "")).startswith("domains.images.stable_diffusion."):
                found.append((path, o))
                return {"generator": path}
            return {k: walk(v, f"{path}.{k}") for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]
        return o

    return found, walk(cfg, "")


def test_every_tiny_image_recipe_has_an_up_to_date_twin():
    sources = make_twins.sources()
    assert len(sources) >= 15  # the DDIM tiny recipes: fine-tuning and steering
    assert make_twins.main(["--check"]) == 0, "run python recipes/images/flow/make_twins.py"
    for src in sources:
        a = yaml.safe_load(src.read_text())
        b = yaml.safe_load(make_twins.twin_path(src).read_text())
        gens_a, rest_a = generator_blocks(a)
        gens_b, rest_b = generator_blocks(strip_runs(b))
        assert rest_a == rest_b, src  # the method, reward, data and trainer are the source's
        assert [p for p, _ in gens_a] == [p for p, _ in gens_b]
        for (_, ga), (_, gb) in zip(gens_a, gens_b):
            assert gb["class_path"].endswith("FlowUNetGenerator")
            ia, ib = dict(ga["init_args"]), dict(gb["init_args"])
            assert ib.pop("pretrained") == "embedded:tiny-shapes-flow"
            assert ib.pop("sde_noise_level") == (0.7 if ia.get("eta", 0) > 0 else 0.0)
            for k in ("pretrained", "sampler", "eta"):
                ia.pop(k, None)
            assert ia == ib, src  # steps, guidance, LoRA, size unchanged
