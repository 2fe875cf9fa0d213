"""Molecule data: RDKit's NCI sample as SELFIES (or SMILES) token tensors (pretraining), and unconditional
"conditions" (one ``None`` per sample) for fine-tuning and steering."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from domains.molecules.chem import VOCABS, MoleculeVocab, load_vocab, nci_smiles
from rewardopt.data import TokenDataModule

VOCAB = Path(__file__).parent / "assets" / "nci_vocab.json"


SMILES_VOCAB = Path(__file__).parent / "assets" / "nci_smiles_vocab.json"


def build_vocab(path: str | Path = VOCAB, seq_len: int = 48, kind: str = "selfies") -> MoleculeVocab:
    """The SELFIES (or SMILES) alphabet of the NCI sample (deterministic), saved to ``path``."""
    vocab = VOCABS[kind].build(nci_smiles(), seq_len)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    vocab.save(path)
    return vocab


def encode_corpus(vocab: MoleculeVocab) -> torch.Tensor:
    """(N, L) ids of every NCI molecule that fits in seq_len tokens of the vocabulary."""
    rows = [ids for ids in (vocab.encode(s) for s in nci_smiles()) if ids is not None]
    return torch.tensor(rows, dtype=torch.long)


class MoleculeDataModule(TokenDataModule):
    """Token tensors for pretraining: a seeded split of the encoded NCI molecules.

    Args:
        vocab: vocab.json path (default: the shipped NCI vocabulary).
        batch_size: sequences per step. val_fraction: held-out share. seed: split seed.
    """

    def __init__(self, vocab: str = str(VOCAB), batch_size: int = 64, val_fraction: float = 0.05,
                 seed: int = 0) -> None:
        self.vocab = load_vocab(vocab)
        super().__init__(encode_corpus(self.vocab), batch_size, val_fraction, seed)


class OracleLabelledDataModule(L.LightningDataModule):
    """(token ids, oracle value) pairs over the encoded NCI molecules, for fitting a surrogate.

    Args:
        oracle: a ``MoleculeReward`` (QED, SA, logP) that labels each molecule.
        vocab: vocab.json path. batch_size, val_fraction, seed: as ``MoleculeDataModule``.
    """

    def __init__(self, oracle, vocab: str = str(VOCAB), batch_size: int = 128, val_fraction: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__()
        self.vocab = load_vocab(vocab)
        ids = encode_corpus(self.vocab)
        smiles = [self.vocab.decode(row) for row in ids.tolist()]
        labels = oracle(smiles).total.float()
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(val_fraction * len(ids)))
        v, t = perm[:n_val], perm[n_val:]
        self.train_set = torch.utils.data.TensorDataset(ids[t], labels[t])
        self.val_set = torch.utils.data.TensorDataset(ids[v], labels[v])
        self.train_labels = labels[t]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=512)
