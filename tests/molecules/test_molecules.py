"""Molecules: SELFIES round trips, RDKit rewards equal RDKit called directly, invalid molecules get
a defined, counted reward, the generator saves/loads, pretraining lowers the NELBO (the recipes run
in tests/test_recipes.py, with this domain's output checks in recipe_checks.py)."""

import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("selfies")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import QED, Crippen  # noqa: E402

from domains.molecules.chem import SelfiesVocab, SmilesVocab, canonical, load_vocab, nci_smiles  # noqa: E402
from domains.molecules.data import SMILES_VOCAB, VOCAB, build_vocab, encode_corpus  # noqa: E402
from domains.molecules.generator import MoleculeGenerator  # noqa: E402
from domains.molecules.rewards import LogPReward, QEDReward, SAReward, ValidityReward, sascorer  # noqa: E402

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "O=C(O)c1ccccc1OC(C)=O"]


@pytest.fixture(scope="module")
def vocab():
    return SelfiesVocab.load(VOCAB)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mol")
    MoleculeGenerator(pretrained=None, vocab=str(VOCAB), num_steps=4, hidden=16, layers=1).save_pretrained(d)
    return d


def one_hots(vocab, smiles):
    return torch.nn.functional.one_hot(torch.tensor([vocab.encode(s) for s in smiles]), len(vocab)).float()


def test_nci_corpus_round_trips(vocab):
    data = encode_corpus(vocab)
    assert data.shape[1] == vocab.seq_len and len(data) > 4000
    for row, smi in zip(data[:50].tolist(), [s for s in nci_smiles() if vocab.encode(s) is not None][:50]):
        assert vocab.decode(row) == canonical(smi)


def test_shipped_vocabularies_are_reproducible(tmp_path):
    for path, kind in ((VOCAB, "selfies"), (SMILES_VOCAB, "smiles")):
        rebuilt = build_vocab(tmp_path / f"{kind}.json", seq_len=48, kind=kind)
        shipped = load_vocab(path)
        assert type(shipped).kind == kind and shipped.tokens == rebuilt.tokens


def test_smiles_tokens_round_trip_and_invalid_strings_decode_to_none():
    v = load_vocab(SMILES_VOCAB)
    assert isinstance(v, SmilesVocab)
    data = encode_corpus(v)
    assert len(data) > 4000
    for row, smi in zip(data[:100].tolist(), [s for s in nci_smiles() if v.encode(s) is not None][:100]):
        assert v.decode(row) == canonical(smi)
    # salts left out
    assert v.split("C[NH3+].[Cl-]") == ["C", "[NH3+]", ".", "[Cl-]"] and v.encode("C[NH3+].[Cl-]") is None
    toks = v.split("Clc1ccc(Br)cc1")
    assert "".join(toks) == canonical("Clc1ccc(Br)cc1") and "Cl" in toks and "Br" in toks and len(toks) == 12
    ring_open = [v.index[t] for t in ("C", "1", "C", "C")] + [v.pad_id] * (v.seq_len - 4)
    assert v.decode(ring_open) is None  # SMILES, unlike SELFIES, can be invalid


def test_smiles_generator_saves_loads_and_its_rewards_count_invalid_samples(tmp_path):
    g = MoleculeGenerator(pretrained=None, vocab=str(SMILES_VOCAB), num_steps=4, hidden=16, layers=1)
    g.save_pretrained(tmp_path)
    g2 = MoleculeGenerator(pretrained=str(tmp_path), num_steps=4)
    assert isinstance(g2.vocab, SmilesVocab) and g2.vocab.tokens == g.vocab.tokens
    with torch.no_grad():
        x = g2.sample(g2.encode_condition([None] * 16), generator=torch.Generator().manual_seed(0))
    r = QEDReward(vocab=str(tmp_path), invalid_value=-1.0)
    out = r(x).total
    n_invalid = sum(s is None for s in g2.smiles(x))
    assert n_invalid > 0 and r.stats["invalid"] == n_invalid and (out == -1.0).sum() == n_invalid  # an untrained model


def test_rdkit_rewards_match_rdkit(vocab, saved_model):
    x = one_hots(vocab, SMILES)
    mols = [Chem.MolFromSmiles(s) for s in SMILES]
    qed = QEDReward(vocab=str(saved_model))(x).total
    sa = SAReward(vocab=str(saved_model))(x).total
    logp = LogPReward(vocab=str(saved_model))(x).total
    assert torch.allclose(qed, torch.tensor([QED.qed(m) for m in mols]), atol=1e-6)
    assert torch.allclose(sa, torch.tensor([(10 - sascorer().calculateScore(m)) / 9 for m in mols]), atol=1e-6)
    assert torch.allclose(logp, torch.tensor([Crippen.MolLogP(m) for m in mols]), atol=1e-5)


def test_invalid_molecules_get_a_defined_counted_reward(vocab, saved_model):
    r = QEDReward(vocab=str(saved_model), invalid_value=-1.0)
    # an all-padding sequence decodes to the empty molecule; a raw invalid SMILES string is passed as is
    empty = torch.nn.functional.one_hot(torch.full((1, vocab.seq_len), vocab.pad_id), len(vocab)).float()
    out = r(empty)
    assert out.total.tolist() == [-1.0] and r.stats["invalid"] == 1
    assert r(["C1CC", "CCO"]).total[0] == -1.0  # unclosed ring: RDKit rejects it
    assert ValidityReward(vocab=str(saved_model))(["C1CC", "CCO"]).total.tolist() == [0.0, 1.0]


def test_generator_loads_and_samples_valid_tokens(saved_model, vocab):
    g = MoleculeGenerator(pretrained=str(saved_model), num_steps=4)
    with torch.no_grad():
        x = g.sample(g.encode_condition([None] * 8), generator=torch.Generator().manual_seed(0))
    ids = g.tokens(x)
    assert ((ids >= 0) & (ids < len(vocab)) & (ids != vocab.mask_id)).all()
    smiles = g.smiles(x)
    assert len(smiles) == 8 and all(s is None or canonical(s) == s for s in smiles)
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        MoleculeGenerator(pretrained="/no/such/folder")


def test_render_draws_valid_molecules_and_greys_invalid_ones(vocab, saved_model):
    from rdkit.Chem import Draw

    g = MoleculeGenerator(pretrained=str(saved_model), num_steps=4)
    x = one_hots(vocab, ["c1ccccc1O"])
    bad = torch.zeros_like(x)
    bad[..., vocab.pad_id] = 1  # an all-padding sequence decodes to no molecule
    pics = g.render(torch.cat([x, bad]), size=96)
    assert pics.shape == (2, 3, 96, 96) and 0 <= pics.min() and pics.max() <= 1
    pic = Draw.MolToImage(Chem.MolFromSmiles(canonical("c1ccccc1O")), size=(96, 96))
    direct = torch.tensor(list(pic.convert("RGB").getdata()))
    assert torch.allclose(pics[0].permute(1, 2, 0).reshape(-1, 3) * 255, direct.float(), atol=1e-3)
    assert torch.all(pics[1] == pics[1, 0, 0, 0]) and 0 < pics[1, 0, 0, 0] < 1


def test_pretraining_lowers_the_nelbo():
    from rewardopt.generators.masked import MaskedDiffusionPretraining

    g = MoleculeGenerator(pretrained=None, vocab=str(VOCAB), num_steps=4, hidden=32, layers=1)
    m = MaskedDiffusionPretraining(g, lr=3e-3)
    data = encode_corpus(g.vocab)[:256]
    opt = m.configure_optimizers()
    rng = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        before = float(m.loss(data, rng()))
    for step in range(30):
        opt.zero_grad()
        m.loss(data[(step % 4) * 64:(step % 4 + 1) * 64]).backward()
        opt.step()
    with torch.no_grad():
        after = float(m.loss(data, rng()))
    assert after < 0.7 * before


def test_surrogate_is_differentiable_and_fits(vocab):
    from rewardopt.rewards.surrogate import SequenceSurrogate

    s = SequenceSurrogate(len(vocab), vocab.seq_len, width=16)
    x = one_hots(vocab, SMILES).requires_grad_(True)
    s.requires_grad_(False)(x).total.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one-hot sequences"):
        s(torch.zeros(2, vocab.seq_len))
    with pytest.raises(FileNotFoundError, match="surrogate checkpoint"):
        SequenceSurrogate(len(vocab), vocab.seq_len, checkpoint="/nope.pt")


@pytest.mark.parametrize("name", ["qed", "sa"])
def test_shipped_surrogates_track_rdkit(vocab, name):
    from rewardopt.rewards.surrogate import SequenceSurrogate
    from tests.conftest import ROOT

    checkpoint = ROOT / f"domains/molecules/assets/surrogate_{name}/surrogate.pt"
    s = SequenceSurrogate(len(vocab), vocab.seq_len, 64, checkpoint=str(checkpoint))
    ids = encode_corpus(vocab)[:300]
    x = torch.nn.functional.one_hot(ids, len(vocab)).float()
    with torch.no_grad():
        pred = s(x).total
    mols = [Chem.MolFromSmiles(vocab.decode(r)) for r in ids.tolist()]
    if name == "qed":
        true = torch.tensor([QED.qed(m) for m in mols])
    else:
        true = torch.tensor([(10 - sascorer().calculateScore(m)) / 9 for m in mols])
    assert float(torch.corrcoef(torch.stack([pred, true]))[0, 1]) > 0.7


def test_surrogate_fit_writes_weights_and_validation(tmp_path):
    import json

    import lightning as L

    from domains.molecules.data import OracleLabelledDataModule
    from rewardopt.rewards.surrogate import SequenceSurrogate, SurrogateFit

    data = OracleLabelledDataModule(LogPReward(), batch_size=64)
    fit = SurrogateFit(SequenceSurrogate(97, 48, width=16), lr=3e-3, output_dir=str(tmp_path))
    L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, val_check_interval=40, num_sanity_val_steps=0).fit(fit, datamodule=data)
    report = json.loads((tmp_path / "surrogate_fit.json").read_text())
    assert report["steps"] == 40 and report["pearson"] > 0.3
    loaded = SequenceSurrogate(97, 48, width=16, checkpoint=str(tmp_path / "surrogate.pt"))
    assert float(loaded.target_std) == pytest.approx(float(data.train_labels.std()), rel=1e-5)
