"""Bring your own model: LoRA (peft) on any denoiser — a class-conditional diffusers UNet2DModel (no
``add_adapter``) and a transformers BERT wrapped as a denoiser — trained, saved in peft's format and
loaded back with identical outputs; the UNet2DModel example fine-tuned through `rewardopt fit`."""

import json
import math

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn
from transformers import BertConfig, BertModel

from rewardopt.cli import main
from rewardopt.testing.class_conditional import ClassConditionalUNetGenerator

NUM_CLASSES = 3  # labels 0..2; label 3 is the "no class" label for CFG


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=NUM_CLASSES + 1)


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A user's model folder: a random class-conditional UNet2DModel and its scheduler, as diffusers saves them."""
    folder = tmp_path_factory.mktemp("byo_unet")
    tiny_unet().save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


def make_unet_generator(folder, **kwargs) -> ClassConditionalUNetGenerator:
    kwargs = {"null_class": NUM_CLASSES, "num_steps": 2, "guidance_scale": 2.0, **kwargs}
    return ClassConditionalUNetGenerator(str(folder), **kwargs)


def perturb_lora(gen, seed: int = 1) -> None:
    """Move every LoRA tensor away from its initialisation (lora_B starts at 0: no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gen.denoiser.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def denoiser_out(gen, labels=("0", "2")) -> torch.Tensor:
    cond = gen.encode_condition(list(labels))
    x = torch.randn((len(labels), *gen.sample_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return gen.model_output(x, 0, cond)


# ----------------------------------------------------------------------------- a transformers denoiser
class PatchBertDenoiser(nn.Module):
    """A ViT-like denoiser: 2x2 patches + time and class embeddings through a transformers BertModel
    (read through ``inputs_embeds``), called like a UNet2DModel: ``(x, t, class_labels) -> (ε̂,)``."""

    def __init__(self, size: int = 8, channels: int = 3, patch: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.size, self.channels, self.patch, self.hidden = size, channels, patch, hidden
        n = (size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, hidden)
        self.time = nn.Linear(hidden, hidden)
        self.label = nn.Embedding(NUM_CLASSES + 1, hidden)
        self.bert = BertModel(BertConfig(vocab_size=2, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=2 * hidden, max_position_embeddings=n,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        self.out = nn.Linear(hidden, channels * patch * patch)

    def forward(self, x, t, class_labels, return_dict=False):
        b, c, h, w = x.shape
        p = self.patch
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        t = torch.as_tensor(t, device=x.device).float().expand(b)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.hidden // 2, device=x.device) / (self.hidden // 2))
        temb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
        hidden = self.embed(tokens) + (self.time(temb) + self.label(class_labels))[:, None]
        hidden = self.bert(inputs_embeds=hidden).last_hidden_state
        out = self.out(hidden).reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return (out,)


class PatchBertGenerator(ClassConditionalUNetGenerator):
    """The example generator with the denoiser swapped (its one override point for the network)."""

    def load_denoiser(self, pretrained):
        torch.manual_seed(0)  # the "pretrained" weights: the same in every instance
        return PatchBertDenoiser()

    @property
    def sample_shape(self):
        return (self.denoiser.channels, self.denoiser.size, self.denoiser.size)


def make_bert_generator(folder, **kwargs) -> PatchBertGenerator:
    kwargs = {"null_class": NUM_CLASSES, "num_steps": 2, "guidance_scale": 2.0, "lora_targets": ["query", "value"],
              **kwargs}
    return PatchBertGenerator(str(folder), **kwargs)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("make", [make_unet_generator, make_bert_generator], ids=["unet2dmodel", "bert"])
def test_lora_on_any_denoiser_trains_only_adapters_and_base_model_disables_them(make, unet_folder):
    gen = make(unet_folder, lora_rank=4)
    names = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names), names
    targets = tuple(gen.lora_targets)
    assert all(n.split(".lora_")[0].endswith(targets) for n in names), "LoRA sits on the configured modules"
    plain = denoiser_out(make(unet_folder, lora_rank=None))
    torch.testing.assert_close(denoiser_out(gen), plain, rtol=0, atol=0)  # lora_B = 0 at initialisation
    perturb_lora(gen)
    assert not torch.allclose(denoiser_out(gen), plain, atol=1e-4), "the adapters change the output"
    with gen.base_model():
        torch.testing.assert_close(denoiser_out(gen), plain, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in gen.named_parameters() if "lora_" in n), "adapters are re-enabled"


@pytest.mark.parametrize("make", [make_unet_generator, make_bert_generator], ids=["unet2dmodel", "bert"])
def test_lora_gradients_reach_every_adapter_through_sampling(make, unet_folder):
    gen = make(unet_folder, lora_rank=2)
    perturb_lora(gen)  # with lora_B = 0 the gradient of lora_A is exactly 0
    cond = gen.encode_condition(["1", "2"])
    x0 = gen.sample(cond, generator=torch.Generator().manual_seed(0), grad_last_k=None)
    gen.decode(x0).mean().backward()
    grads = {n: p.grad for n, p in gen.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("make", [make_unet_generator, make_bert_generator], ids=["unet2dmodel", "bert"])
def test_generic_lora_saves_in_peft_format_and_loads_back_with_the_same_outputs(make, unet_folder, tmp_path):
    from peft import PeftModel

    gen = make(unet_folder, lora_rank=4)
    perturb_lora(gen)
    path = gen.save_lora(tmp_path / "adapter")
    assert path.name == "adapter_model.safetensors" and path.is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and set(config["target_modules"]) == set(gen.lora_targets)
    fresh = make(unet_folder, lora_rank=None)  # no adapters: load_lora injects them from the saved config
    fresh.load_lora(tmp_path / "adapter")
    torch.testing.assert_close(denoiser_out(fresh), denoiser_out(gen), rtol=0, atol=0)
    assert fresh.lora_rank == 4 and [n for n, p in fresh.named_parameters() if p.requires_grad]
    with fresh.base_model(), gen.base_model():
        torch.testing.assert_close(denoiser_out(fresh), denoiser_out(gen), rtol=0, atol=0)
    # peft's own format: peft loads it onto a plain copy of the user's network
    base = make(unet_folder, lora_rank=None)
    x, t, labels = torch.randn(2, *gen.sample_shape), torch.tensor(5), torch.tensor([0, 2])
    peft_model = PeftModel.from_pretrained(base.denoiser, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x, t, class_labels=labels)[0], gen.denoiser(x, t, class_labels=labels)[0])


def test_load_lora_into_a_generator_with_adapters_of_another_rank_is_a_clear_error(unet_folder, tmp_path):
    gen = make_unet_generator(unet_folder, lora_rank=4)
    gen.save_lora(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"has rank 4; .*generator.lora_rank=2"):
        make_unet_generator(unet_folder, lora_rank=2).load_lora(tmp_path / "adapter")


def lora_scalings(gen) -> set[float]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {m.scaling["default"] for m in gen.denoiser.modules() if isinstance(m, BaseTunerLayer)}


def test_load_lora_with_another_lora_alpha_is_a_clear_error_and_adopted_without_adapters(unet_folder, tmp_path):
    """Same rank, another alpha (scale alpha/r 2 instead of 1): loading it silently would change every output."""
    gen = make_unet_generator(unet_folder, lora_rank=4)
    perturb_lora(gen)
    gen.save_lora(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_alpha": 8}))  # an adapter trained with alpha 8
    with pytest.raises(ValueError, match=r"has lora_alpha 8; this generator has 4 \(generator.lora_alpha=None; "
                                         r"set it to 8, or generator.lora_rank to null to take the file's\)"):
        make_unet_generator(unet_folder, lora_rank=4).load_lora(tmp_path / "adapter")
    fresh = make_unet_generator(unet_folder, lora_rank=None)  # no adapters yet: the file's alpha is taken
    fresh.load_lora(tmp_path / "adapter")
    assert (fresh.lora_rank, fresh.lora_alpha) == (4, 8) and lora_scalings(fresh) == {2.0}


def test_load_lora_with_other_target_modules_is_a_clear_error(unet_folder, tmp_path):
    make_unet_generator(unet_folder, lora_rank=4, lora_targets=["to_q", "to_v"]).save_lora(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"has target_modules \['to_q', 'to_v'\]; this generator has "
                                         r"generator.lora_targets=\['to_k', 'to_out.0', 'to_q', 'to_v'\] \(set it to "
                                         r"\['to_q', 'to_v'\], or generator.lora_rank to null to take the file's\)"):
        make_unet_generator(unet_folder, lora_rank=4).load_lora(tmp_path / "adapter")


def test_lora_targets_that_match_no_module_name_the_key_and_the_candidates(unet_folder):
    with pytest.raises(ValueError, match=r"generator.lora_targets: none of \['q_proj'\] .* PatchBertDenoiser.*'query'"):
        make_bert_generator(unet_folder, lora_rank=4, lora_targets=["q_proj"])


def test_byo_unet_lora_trains_through_rewardopt_fit_and_its_adapter_loads_back(unet_folder, tmp_path):
    """The user's generator in a recipe: `rewardopt fit` trains its LoRA (DRaFT-1 on a colour reward)
    and writes a peft adapter that reproduces the trained model's outputs."""
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),  # where the resolved config.yaml goes
            "num_sanity_val_steps": 0, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
        "model": {
            "class_path": "rewardopt.methods.draft.DRaFT",
            "init_args": {
                "generator": {"class_path": "rewardopt.testing.class_conditional.ClassConditionalUNetGenerator",
                              "init_args": {"pretrained": str(unet_folder), "null_class": NUM_CLASSES, "num_steps": 2,
                                            "guidance_scale": 2.0, "lora_rank": 4}},
                "reward": {"class_path": "domains.images.rewards.ColourReward", "init_args": {"colour": "blue"}},
                "k": 1, "lr": 0.01, "weight_decay": 0.0, "output_dir": str(tmp_path / "run"),
            },
        },
        "data": {"class_path": "rewardopt.data.PromptDataModule",
                 "init_args": {"train_prompts": ["0", "1", "2"], "val_prompts": ["0", "2"], "batch_size": 2,
                               "val_batch_size": 2, "val_repeats": 1}},
    }
    config = tmp_path / "byo.yaml"
    config.write_text(yaml.safe_dump(recipe))
    main(["fit", "--config", str(config)])

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["adapter"].endswith("adapter_model.safetensors")
    trained = {k.removeprefix("generator."): v for k, v in
               torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"].items()}
    assert trained and all("lora_" in k for k in trained)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k), "every adapter was trained"
    reference = make_unet_generator(unet_folder, lora_rank=4)
    reference.load_state_dict(trained, strict=False)
    loaded = make_unet_generator(unet_folder, lora_rank=None)
    loaded.load_lora(tmp_path / "run" / "adapter")
    torch.testing.assert_close(denoiser_out(loaded), denoiser_out(reference), rtol=0, atol=0)
    assert not torch.allclose(denoiser_out(loaded), denoiser_out(make_unet_generator(unet_folder)), atol=1e-5)


def test_contributing_shows_the_tested_example():
    """CONTRIBUTING's "Bring your own model" snippet is this example's class, verbatim."""
    from pathlib import Path

    import rewardopt.testing.class_conditional as example

    doc = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    section = doc[doc.index("## Bring your own model"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start:section.index("\n```", start)]
    source = Path(example.__file__).read_text()
    assert snippet.startswith("class ClassConditionalUNetGenerator") and source.rstrip().endswith(snippet.rstrip())
