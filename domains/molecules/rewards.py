"""Molecule rewards from RDKit (black-box) on sampled SELFIES sequences.

Samples are the generator's one-hot sequences (B, L, V); ``to_object`` turns each into canonical
SMILES (or None). An invalid molecule never crashes a run: it gets ``invalid_value`` and is
counted in ``stats["invalid"]``.

* ``QEDReward`` — RDKit's QED drug-likeness in [0, 1].
* ``SAReward`` — synthetic accessibility from RDKit Contrib SA_Score, rescaled (10 - SA) / 9 to
  [0, 1] (higher = easier to make).
* ``LogPReward`` — Crippen logP.
* ``ValidityReward`` — 1 if RDKit parses the molecule, else 0.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from functools import lru_cache
from typing import Any

import torch

from domains.molecules.chem import load_vocab
from domains.molecules.generator import resolve_pretrained
from rewardopt.rewards.blackbox import BlackBoxReward


@lru_cache(maxsize=1)
def sascorer():
    from rdkit import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this RDKit build does not ship Contrib/SA_Score")
    spec = importlib.util.spec_from_file_location("sascorer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class MoleculeReward(BlackBoxReward):
    """Base: one-hot sequences -> SMILES -> ``property(mol)``; invalid molecules -> ``invalid_value``.

    Args:
        vocab: folder (or "embedded:tiny-nci") holding the generator's ``vocab.json``.
        invalid_value: reward of a sample RDKit cannot parse (counted in ``stats["invalid"]``).
        Other args: ``BlackBoxReward``.
    """

    def __init__(self, vocab: str = "embedded:tiny-nci", invalid_value: float = 0.0, max_workers: int = 2,
                 timeout_s: float | None = 30.0, retries: int = 0, cache_size: int = 100_000,
                 on_failure: str | float | None = None, name: str | None = None) -> None:
        super().__init__(max_workers=max_workers, timeout_s=timeout_s, retries=retries, cache_size=cache_size,
                         on_failure=on_failure, name=name)
        self.vocab = load_vocab(os.path.join(resolve_pretrained(vocab), "vocab.json"))
        self.invalid_value = float(invalid_value)
        self.stats["invalid"] = 0
        self._count_lock = threading.Lock()

    def to_object(self, sample: Any) -> str | None:
        if isinstance(sample, str) or sample is None:
            return sample
        t = torch.as_tensor(sample)
        ids = t.argmax(-1) if t.ndim == 2 else t
        return self.vocab.decode(ids.tolist())

    def property(self, mol) -> float:
        raise NotImplementedError

    def score_object(self, smiles: str | None, cond: Any) -> float:
        from rdkit import Chem

        mol = Chem.MolFromSmiles(smiles) if smiles else None
        if mol is None:
            with self._count_lock:
                self.stats["invalid"] += 1
            return self.invalid_value
        return float(self.property(mol))


class QEDReward(MoleculeReward):
    def property(self, mol) -> float:
        from rdkit.Chem import QED

        return QED.qed(mol)


class SAReward(MoleculeReward):
    def property(self, mol) -> float:
        return (10.0 - sascorer().calculateScore(mol)) / 9.0


class LogPReward(MoleculeReward):
    def property(self, mol) -> float:
        from rdkit.Chem import Crippen

        return Crippen.MolLogP(mol)


class ValidityReward(MoleculeReward):
    def property(self, mol) -> float:
        return 1.0
