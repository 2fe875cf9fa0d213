"""Molecules as fixed-length SELFIES token sequences.

SELFIES (Krenn et al., 2020) makes every token string decode to *some* molecule, so a sequence
model's samples are mostly valid by construction; RDKit can still reject the decoded SMILES, and
every reward here gives such samples a defined value and counts them. Sequences are padded with
SELFIES's own "[nop]" token (ignored on decoding), so the model can generate variable lengths.
The corpus is RDKit's bundled ``Data/NCI/first_5K.smi`` (5,000 real NCI molecules; offline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

PAD = "[nop]"
MASK = "[MASK]"


def nci_smiles() -> list[str]:
    """The 5,000 SMILES RDKit ships in Data/NCI/first_5K.smi (first column)."""
    from rdkit import RDConfig

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this RDKit build does not ship the NCI sample")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def canonical(smiles: str) -> str | None:
    """RDKit canonical SMILES, or None if RDKit cannot parse it (or it is empty)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    if not smiles:
        return None
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() > 0 else None


class SelfiesVocab:
    """Token <-> id maps for SELFIES with "[nop]" padding and a "[MASK]" token (last id)."""

    def __init__(self, tokens: Sequence[str], seq_len: int) -> None:
        tokens = list(tokens)
        if PAD not in tokens:
            raise ValueError(f"the vocabulary must contain {PAD}")
        if MASK in tokens:
            tokens.remove(MASK)
        self.tokens = tokens + [MASK]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def mask_id(self) -> int:
        return self.index[MASK]

    @classmethod
    def build(cls, smiles: Sequence[str], seq_len: int) -> "SelfiesVocab":
        import selfies as sf

        encoded = [e for e in (to_selfies(s) for s in smiles) if e is not None]
        return cls(sorted(sf.get_alphabet_from_selfies(encoded) | {PAD}), seq_len)

    def encode(self, smiles: str) -> list[int] | None:
        """SMILES -> seq_len ids (padded with [nop]); None if it cannot be encoded, is too long or
        uses a token outside the vocabulary."""
        import selfies as sf

        e = to_selfies(smiles)
        if e is None:
            return None
        toks = list(sf.split_selfies(e))
        if len(toks) > self.seq_len or any(t not in self.index for t in toks):
            return None
        return [self.index[t] for t in toks] + [self.pad_id] * (self.seq_len - len(toks))

    def decode(self, ids: Sequence[int]) -> str | None:
        """ids -> canonical SMILES, or None when the result is not a valid molecule."""
        import selfies as sf

        s = "".join(self.tokens[int(i)] for i in ids if int(i) != self.mask_id)
        try:
            smi = sf.decoder(s)
        except Exception:  # noqa: BLE001 - selfies raises its own DecoderError on malformed strings
            return None
        return canonical(smi) if smi else None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens, "seq_len": self.seq_len}, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SelfiesVocab":
        d = json.loads(Path(path).read_text())
        return cls(d["tokens"], d["seq_len"])


def to_selfies(smiles: str) -> str | None:
    import selfies as sf

    c = canonical(smiles)
    if c is None:
        return None
    try:
        return sf.encoder(c)
    except Exception:  # noqa: BLE001 - selfies.EncoderError for unsupported valences
        return None
