"""The declared Generator contract: a small required core, capabilities checked with isinstance when a
method is built (a wrong pairing names the capability), no attribute probes in methods/callbacks,
rewards differentiable only when declared."""

import re
from pathlib import Path

import pytest
import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.generators.capabilities import DeterministicStep, Trainable, require
from rewardopt.rewards.base import Reward
from rewardopt.testing.toy import RandomWalkGenerator, SumReward
from tests.test_autoregressive import make as make_autoregressive
from tests.test_masked_diffusion import CountToken
from tests.test_masked_diffusion import make as make_masked

ROOT = Path(__file__).resolve().parents[1]


class PlainWalk(Generator):
    """The sampling core only (no capability): a random walk."""

    def __init__(self, num_steps: int = 3) -> None:
        super().__init__()
        self.register_buffer("_t", torch.arange(num_steps, 0, -1), persistent=False)

    @property
    def timesteps(self):
        return self._t

    def encode_condition(self, raw):
        return Condition(list(raw))

    def init_state(self, cond, generator=None):
        return torch.randn((len(cond), 2), generator=generator)

    def model_output(self, x_t, i, cond):
        self.counter.nfe += x_t.shape[0]
        return x_t

    def step(self, x_t, i, cond, noise=None, generator=None, out=None):
        out = self.model_output(x_t, i, cond) if out is None else out
        return out + (torch.randn(x_t.shape, generator=generator) if noise is None else noise)

    def predict_x0(self, x_t, i, cond, out=None):
        return self.model_output(x_t, i, cond) if out is None else out

    def decode(self, x0):
        self.counter.count_decodes(x0.shape[0])
        return x0


def test_the_core_is_small_and_model_output_is_required():
    assert Generator.__abstractmethods__ == {"timesteps", "encode_condition", "init_state", "model_output", "step",
                                             "predict_x0", "decode"}

    class NoModelOutput(PlainWalk):
        model_output = Generator.model_output

    with pytest.raises(TypeError, match="model_output"):
        NoModelOutput()


@pytest.mark.parametrize("method", ["DRaFT", "DDPO", "DRAKES", "DiffRO", "Reinforce"])
def test_fine_tuning_needs_a_trainable_generator(method):
    import rewardopt.methods as methods_pkg  # noqa: F401
    from rewardopt.methods.ddpo import DDPO
    from rewardopt.methods.diffro import DiffRO
    from rewardopt.methods.draft import DRaFT
    from rewardopt.methods.drakes import DRAKES
    from rewardopt.methods.reinforce import Reinforce

    cls = {"DRaFT": DRaFT, "DDPO": DDPO, "DRAKES": DRAKES, "DiffRO": DiffRO, "Reinforce": Reinforce}[method]
    with pytest.raises(TypeError, match=rf"{method} needs a Trainable generator \(setup_trainable, base_model, "
                                        r"has_base_model, save_trained\); PlainWalk does not declare Trainable\. "
                                        r"Generators that do: .*MaskedDiffusionGenerator"):
        cls(PlainWalk(), SumReward())


def test_dsearch_lookahead_needs_a_deterministic_step():
    from rewardopt.methods.dsearch import DSearch

    DSearch(PlainWalk(), SumReward(), width=2, lookahead=0)  # no look-ahead: the core suffices
    with pytest.raises(TypeError, match=r"DSearch lookahead=1 .* needs a DeterministicStep generator "
                                        r"\(deterministic_step\); PlainWalk does not declare .*RandomWalkGenerator"):
        DSearch(PlainWalk(), SumReward(), width=2, lookahead=1)
    DSearch(RandomWalkGenerator(), SumReward(), width=2, lookahead=1)


def test_family_specific_methods_name_the_family():
    from rewardopt.methods.ddpo import DDPO
    from rewardopt.methods.draft import DRaFT

    with pytest.raises(TypeError, match="DRaFT backpropagates through continuous diffusion"):
        DRaFT(make_masked(full_finetune=True), CountToken())
    with pytest.raises(TypeError, match="DDPO needs a TransitionLogProbs generator"):
        DDPO(make_autoregressive(full_finetune=True), CountToken())


def test_dril_needs_a_two_stage_model():
    from rewardopt.methods.dril import DRIL

    with pytest.raises(TypeError, match="DRIL needs a TwoStageSeq2Seq model"):
        DRIL(torch.nn.Linear(2, 2))


def test_require_names_the_capability_and_who_declares_it():
    require(RandomWalkGenerator(), DeterministicStep, "x")
    with pytest.raises(TypeError, match=r"my callback needs a Trainable generator .*AutoregressiveGenerator.*"
                                        r"inherit rewardopt\.generators\.capabilities\.Trainable"):
        require(RandomWalkGenerator(), Trainable, "my callback")


def test_rewards_are_black_box_unless_declared_differentiable():
    from rewardopt.methods.drakes import DRAKES

    class Undeclared(Reward):
        def score(self, samples, cond):
            return samples.flatten(1).sum(1)

    assert not Undeclared().differentiable and Undeclared().differentiable_part() is None
    with pytest.raises(TypeError, match="DRAKES needs a differentiable reward"):
        DRAKES(make_masked(full_finetune=True), Undeclared())
    assert SumReward().differentiable


def test_setup_trainable_is_idempotent_and_the_method_calls_it():
    """One rule for every family: the fine-tuning method calls setup_trainable(); calling it again keeps
    the same frozen copy (masked diffusion used to be set up by three methods behind a private flag)."""
    from rewardopt.methods.drakes import DRAKES

    g = make_masked(full_finetune=True)
    assert not g.has_base_model  # nothing set up yet
    DRAKES(g, CountToken(), truncate=1)
    assert g.has_base_model
    frozen = g.__dict__["_frozen"][0]
    g.setup_trainable()
    assert g.__dict__["_frozen"][0] is frozen
    assert all(p.requires_grad for p in g.denoiser.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())


def test_kl_terms_need_a_base_model():
    from rewardopt.methods.drakes import DRAKES

    with pytest.raises(ValueError, match="kl_weight > 0 needs the frozen pretrained copy"):
        DRAKES(make_masked(full_finetune=False), CountToken(), kl_weight=0.1)


def test_the_token_lm_keeps_its_network_under_its_own_name():
    """The frozen-copy machinery reads ``network_attr`` (the LM is ``lm``, no ``denoiser`` alias)."""
    from tests.test_autoregressive import make

    g = make(full_finetune=True)
    assert g.network_attr == "lm" and "denoiser" not in dict(g.named_children())
    g.setup_trainable()
    live = g.lm
    with g.base_model():
        assert g.lm is not live and not any(p.requires_grad for p in g.lm.parameters())
    assert g.lm is live


def test_save_trained_writes_the_family_format(tmp_path):
    """A masked generator trained in full without its own save_pretrained writes the network's
    safetensors (tied LM-head weights and all), which load back into a fresh network."""
    from safetensors.torch import load_model

    g = make_masked(full_finetune=True)
    g.setup_trainable()
    with torch.no_grad():
        for p in g.trainable_parameters():
            p.add_(0.1)
    path = g.save_trained(tmp_path / "adapter")
    assert path.name == "denoiser.safetensors"
    fresh = make_masked()
    load_model(fresh.denoiser, str(path))
    for a, b in zip(fresh.denoiser.state_dict().values(), g.denoiser.state_dict().values()):
        assert torch.equal(a, b)


def test_write_samples_dispatches_on_declared_capabilities(tmp_path):
    from domains.dna.generator import DNAGenerator

    dna = DNAGenerator(pretrained=None, num_steps=2, seq_len=8, hidden=16, layers=1)
    with torch.no_grad():
        s = dna.decode(dna.sample(dna.encode_condition([None, None]), generator=torch.Generator().manual_seed(0)))
    (txt,) = dna.write_samples(s, tmp_path, "dna")
    assert txt.suffix == ".txt" and len(txt.read_text().splitlines()) == 2
    (jsonl,) = PlainWalk().write_samples(torch.zeros(3, 2), tmp_path, "walk")
    assert jsonl.suffix == ".jsonl" and len(jsonl.read_text().splitlines()) == 3
    with pytest.warns(UserWarning, match="look like images but it does not declare ImageSamples"):
        PlainWalk().write_samples(torch.zeros(2, 3, 4, 4), tmp_path, "pictures")  # said out loud, not silent


def test_a_dropped_undeclared_member_of_an_ensemble_is_said_out_loud():
    from rewardopt.rewards.base import WeightedSum, require_gradient

    class Undeclared(Reward):
        def score(self, samples, cond):
            return samples.flatten(1).sum(1)

    with pytest.warns(UserWarning, match=r"differentiable members of .* only; \['mine'\]"):
        part = require_gradient("DRaFT", WeightedSum({"sum": SumReward(), "mine": Undeclared()}))
    assert part.name.endswith("[differentiable]")


def test_steering_takes_negative_seeds():
    from rewardopt.methods.best_of_n import BestOfN

    a, b = BestOfN(RandomWalkGenerator(), SumReward(), n=2, seed=-1).rngs(0)
    assert a.initial_seed() != b.initial_seed()


def test_checkpoints_must_hold_every_trainable_weight_and_old_names_are_renamed():
    """Loading is non-strict (checkpoints hold trainable weights only): a renamed key must not load nothing
    silently. The token LM's weights were stored as ``denoiser`` before; they are renamed to ``lm``."""
    from rewardopt.methods.reinforce import Reinforce
    from tests.test_autoregressive import make
    from tests.test_finetune_review import Count3

    m = Reinforce(make(full_finetune=True), Count3(), kl_weight=0.1)
    trained = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("generator.lm.")}
    old = {"state_dict": {"generator.denoiser." + k[len("generator.lm."):]: v for k, v in trained.items()}}
    m.on_load_checkpoint(old)
    assert set(old["state_dict"]) == set(trained)
    with pytest.raises(KeyError, match="lacks 1 of this run's trainable weights"):
        m.on_load_checkpoint({"state_dict": dict(list(trained.items())[1:])})


PROBE = re.compile(r"(getattr|hasattr)\(\s*(self\.)?(pl_module\.)?(generator|g)\b")


def test_no_method_or_callback_probes_generator_attributes():
    files = sorted((ROOT / "rewardopt" / "methods").glob("*.py")) + [ROOT / "rewardopt" / "callbacks.py"]
    hits = [f"{f.name}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if PROBE.search(line)]
    assert not hits, "declare a capability instead of probing attribute names:\n" + "\n".join(hits)
    assert PROBE.search('getattr(generator, "lora_rank", None)') and PROBE.search("hasattr(self.generator, 'x')")
