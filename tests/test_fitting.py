"""The network fits (rewardopt.fitting.NetworkFit): the warm-up / decay schedule step by step, and
every fit module writing its weights and ``<name>_fit.json`` into ``output_dir``, loadable again."""

import json

import lightning as L
import pytest
import torch

from tests.conftest import tiny_generator


def reference_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The schedule the pretraining recipes were tuned with: linear warm-up over ``warmup_steps``
    times a linear decay to a 5% floor at ``total_steps``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * (max(0.05, 1 - step / total_steps) if total_steps else 1.0)


@pytest.mark.parametrize("warmup_steps, total_steps", [(100, 1000), (200, 6000), (100, 2000), (10, 0), (0, 30),
                                                       (0, 2), (1, 2), (5, 7), (3, 21), (0, 1), (25, 10), (2, 0)])
def test_warmup_decay_follows_the_reference_factors_step_by_step(warmup_steps, total_steps):
    from rewardopt.schedules import warmup_decay

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = warmup_decay(opt, warmup_steps, total_steps)["scheduler"]
    assert not isinstance(sched, torch.optim.lr_scheduler.LambdaLR), "built from torch's schedulers"
    for step in range(max(total_steps, warmup_steps) + 20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * reference_factor(step, warmup_steps, total_steps),
                                                          rel=1e-9, abs=1e-15), f"step {step}"
        opt.step()
        sched.step()


def test_warmup_decay_resumes_from_its_state_dict():
    from rewardopt.schedules import warmup_decay

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, warmup_decay(opt, 10, 40)["scheduler"]

    opt, sched = make()
    for _ in range(25):  # past the warm-up, into the decay
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for step in range(25, 45):
        assert opt2.param_groups[0]["lr"] == pytest.approx(reference_factor(step, 10, 40), rel=1e-9), f"step {step}"
        opt2.step()
        sched2.step()


def test_warmup_decay_is_off_without_warmup_or_decay():
    from rewardopt.schedules import warmup_decay

    assert warmup_decay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0, 0) is None


def test_decay_needs_max_steps():
    from domains.molecules.generator import MoleculeGenerator
    from rewardopt.generators.masked import MaskedDiffusionPretraining
    from tests.molecules.test_molecules import VOCAB

    g = MoleculeGenerator(pretrained=None, vocab=str(VOCAB), num_steps=2, hidden=16, layers=1)
    m = MaskedDiffusionPretraining(g, decay=True)
    m.trainer = L.Trainer(logger=False, enable_checkpointing=False)  # max_steps unset (-1)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        m.configure_optimizers()


class ListData(L.LightningDataModule):
    """Fixed training and held-out items, batches as lists (or stacked tensors with ``collate=None``)."""

    def __init__(self, train, val, batch_size=2, collate=list, **attrs):
        super().__init__()
        self.train, self.val, self.batch_size, self.collate = train, val, batch_size, collate
        self.__dict__.update(attrs)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)


def _masked(out):
    from domains.molecules.generator import MoleculeGenerator
    from rewardopt.generators.masked import MaskedDiffusionPretraining
    from tests.molecules.test_molecules import VOCAB

    g = MoleculeGenerator(pretrained=None, vocab=str(VOCAB), num_steps=2, hidden=16, layers=1)
    ids = torch.randint(0, len(g.vocab), (8, 12), generator=torch.Generator().manual_seed(0))
    m = MaskedDiffusionPretraining(g, lr=1e-3, warmup_steps=1, decay=True, output_dir=out)
    return m, ListData(ids, ids[:2], collate=None), lambda: MoleculeGenerator(pretrained=out, num_steps=2).denoiser


def _causal(out):
    from domains.tts.data import TTSDataModule
    from domains.tts.generator import CodecLMGenerator
    from rewardopt.generators.autoregressive import CausalLMPretraining

    g = CodecLMGenerator(pretrained=None, hidden=16, layers=1, max_new_tokens=8)
    m = CausalLMPretraining(g, lr=1e-3, output_dir=out)
    dm = TTSDataModule(batch_size=2, val_batch_size=2, max_val=2, val_targets=True, epoch_size=4)
    return m, dm, lambda: CodecLMGenerator(pretrained=out, max_new_tokens=8).lm


def _value(out):
    from domains.images.rewards import ColourReward
    from rewardopt.values import ConvValue, ValueRegression

    g = tiny_generator(num_steps=2, lora_rank=None)
    m = ValueRegression(g, ColourReward(), ConvValue(3, num_steps=2, width=8), levels_per_rollout=2, output_dir=out)
    return m, ListData(["a red circle"] * 4, []), \
        lambda: ConvValue(3, num_steps=2, width=8, checkpoint=f"{out}/value.pt")


def _surrogate(out):
    from rewardopt.rewards.surrogate import SequenceSurrogate, SurrogateFit

    ids = torch.randint(0, 10, (8, 12), generator=torch.Generator().manual_seed(0))
    y = ids.float().mean(1)
    data = torch.utils.data.TensorDataset(ids, y)
    m = SurrogateFit(SequenceSurrogate(10, 12, width=8), output_dir=out)
    return m, ListData(data, data, batch_size=4, collate=None, train_labels=y), \
        lambda: SequenceSurrogate(10, 12, width=8, checkpoint=f"{out}/surrogate.pt")


def _token_model(out):
    from domains.tts.data import CorpusItemsDataModule
    from domains.tts.rewards import CodecTokenModel, TokenModelFit

    m = TokenModelFit(hidden=16, output_dir=out)
    return m, CorpusItemsDataModule(batch_size=2, val_batch_size=2, epoch_size=4), \
        lambda: CodecTokenModel.load(f"{out}/model.pt")


def _recogniser(out):
    from domains.tts.data import CORPUS, load_corpus
    from domains.tts.rewards import AudioRecogniser, RecogniserFit

    items = load_corpus(CORPUS)["items"][:4]
    mels = [(torch.randn(24, 64, generator=torch.Generator().manual_seed(k)) - 6, i) for k, i in enumerate(items)]
    m = RecogniserFit(hidden=16, output_dir=out)
    return m, ListData(mels, mels[:2]), lambda: AudioRecogniser.load(f"{out}/model.pt")


def _tiny_text_to_image(out):
    from domains.images.stable_diffusion import StableDiffusionGenerator
    from domains.images.tiny import ShapesDataModule, TinyTextToImagePretraining

    m = TinyTextToImagePretraining(output_dir=out, size=16, channels=[8, 16])
    return m, ShapesDataModule(batch_size=2, length=4, size=16), \
        lambda: StableDiffusionGenerator(pretrained=out, height=16, width=16, num_steps=2, lora_rank=None).denoiser


def _shape_classifier(out):
    from domains.images.rewards import ShapeClassifier
    from domains.images.tiny import ShapeClassifierTraining, ShapesDataModule

    m = ShapeClassifierTraining(output_dir=out, width=8, size=16)
    return m, ShapesDataModule(batch_size=2, length=4, size=16), lambda: ShapeClassifier.from_pretrained(out)


FITS = {"masked_pretraining": (_masked, "generator", True), "causal_pretraining": (_causal, "generator", True),
        "value": (_value, "value", False), "surrogate": (_surrogate, "surrogate", True),
        "token_model": (_token_model, "model", True), "recogniser": (_recogniser, "model", True),
        "tiny_text_to_image": (_tiny_text_to_image, "generator", True),
        "shape_classifier": (_shape_classifier, "classifier", True)}


@pytest.mark.parametrize("kind", FITS)
def test_fit_writes_loadable_weights_and_its_report_into_output_dir(kind, tmp_path):
    build, name, validates = FITS[kind]
    out = str(tmp_path / "out")
    torch.manual_seed(0)
    module, data, load = build(out)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
              val_check_interval=2 if validates else None, limit_val_batches=1 if validates else 0,
              default_root_dir=str(tmp_path / "root")).fit(module, datamodule=data)
    report = json.loads((tmp_path / "out" / f"{name}_fit.json").read_text())
    assert report["steps"] == 2 and report["weights"].startswith(out)
    if validates:
        assert len(report) > 2, f"the held-out scores are reported: {report}"
    trained = dict(module.named_parameters())
    checked = 0
    for key, p in load().state_dict().items():
        match = [v for k, v in trained.items() if k.endswith("." + key)]
        if len(match) == 1:
            assert torch.equal(p, match[0].detach()), f"{key} was saved as trained"
            checked += 1
    assert checked > 0
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_fit_without_output_dir_writes_into_the_trainer_folder(tmp_path):
    build, _, _ = FITS["surrogate"]
    module, data, _ = build(None)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(module, data)
    assert (tmp_path / "surrogate.pt").is_file()
    assert json.loads((tmp_path / "surrogate_fit.json").read_text())["steps"] == 1
