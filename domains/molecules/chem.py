"""Molecules as fixed-length SELFIES (default) or SMILES token sequences.

SELFIES (Krenn et al., 2020) makes every token string decode to *some* molecule, so a sequence
model's samples are mostly valid by construction; RDKit can still reject the decoded SMILES, and
every reward here gives such samples a defined value and counts them. Sequences are padded with
SELFIES's own "[nop]" token (ignored on decoding), so the model can generate variable lengths.
The corpus is RDKit's bundled ``Data/NCI/first_5K.smi`` (5,000 real NCI molecules; offline).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

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


class MoleculeVocab:
    """Token <-> id maps for fixed-length molecule strings: a padding token, and "[MASK]" (last id).

    Subclasses say how a SMILES becomes tokens (``split``) and tokens become a SMILES (``join``).
    ``load_vocab`` reads either kind from a vocab.json.
    """

    kind = ""
    PAD = ""
    EXCLUDE = frozenset({"."})  # multi-fragment entries (salts, mixtures) stay out of the corpus

    def __init__(self, tokens: Sequence[str], seq_len: int) -> None:
        tokens = list(tokens)
        if self.PAD not in tokens:
            raise ValueError(f"the vocabulary must contain {self.PAD}")
        if MASK in tokens:
            tokens.remove(MASK)
        self.tokens = tokens + [MASK]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index[self.PAD]

    @property
    def mask_id(self) -> int:
        return self.index[MASK]

    def split(self, smiles: str) -> list[str] | None:
        """A SMILES -> its tokens in this representation (None if it cannot be represented)."""
        raise NotImplementedError

    def join(self, tokens: list[str]) -> str | None:
        """Tokens (padding and [MASK] removed) -> a SMILES string, None if malformed."""
        raise NotImplementedError

    @classmethod
    def build(cls, smiles: Sequence[str], seq_len: int) -> "MoleculeVocab":
        """The alphabet of a corpus (sorted, so deterministic) plus padding."""
        split = cls([cls.PAD], seq_len).split
        alphabet = {t for s in smiles for t in (split(s) or [])} - cls.EXCLUDE
        return cls(sorted(alphabet | {cls.PAD}), seq_len)

    def encode(self, smiles: str) -> list[int] | None:
        """SMILES -> seq_len ids (padded); None if it cannot be encoded, is too long or uses a token
        outside the vocabulary."""
        toks = self.split(smiles)
        if toks is None or len(toks) > self.seq_len or any(t not in self.index for t in toks):
            return None
        return [self.index[t] for t in toks] + [self.pad_id] * (self.seq_len - len(toks))

    def decode(self, ids: Sequence[int]) -> str | None:
        """ids -> canonical SMILES, or None when the result is not a valid molecule."""
        skip = (self.mask_id, self.pad_id)
        smi = self.join([self.tokens[int(i)] for i in ids if int(i) not in skip])
        return canonical(smi) if smi else None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind, "tokens": self.tokens, "seq_len": self.seq_len}, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MoleculeVocab":
        return load_vocab(path)


class SelfiesVocab(MoleculeVocab):
    """SELFIES tokens, padded with SELFIES's own "[nop]" (ignored on decoding)."""

    kind, PAD = "selfies", "[nop]"

    def split(self, smiles: str) -> list[str] | None:
        import selfies as sf

        e = to_selfies(smiles)
        return None if e is None else list(sf.split_selfies(e))

    def join(self, tokens: list[str]) -> str | None:
        import selfies as sf

        try:
            return sf.decoder("".join(tokens))
        except Exception:  # noqa: BLE001 - selfies raises its own DecoderError on malformed strings
            return None


# SMILES tokens: bracket atoms, two-letter organic-subset atoms, %nn ring closures, then single
# characters (atoms, aromatic atoms, bonds, branches, ring digits, dot, wildcard).
_SMILES_TOKEN = re.compile(r"\[[^\[\]]+\]|Br|Cl|%\d\d|[BCNOPSFIbcnops]|[-=#$:/\\.()~*]|\d")


class SmilesVocab(MoleculeVocab):
    """Canonical SMILES, atom-level tokens, padded with "<pad>". Unlike SELFIES, a sampled string
    can be syntactically invalid: decoding returns None and rewards count it as invalid."""

    kind, PAD = "smiles", "<pad>"

    def split(self, smiles: str) -> list[str] | None:
        c = canonical(smiles)
        if c is None:
            return None
        toks = _SMILES_TOKEN.findall(c)
        return toks if "".join(toks) == c else None  # a character the pattern does not know

    def join(self, tokens: list[str]) -> str | None:
        return "".join(tokens) or None


VOCABS = {v.kind: v for v in (SelfiesVocab, SmilesVocab)}


def load_vocab(path: str | os.PathLike) -> MoleculeVocab:
    """A vocab.json of either kind (files without "kind" are SELFIES)."""
    d = json.loads(Path(path).read_text())
    kind = d.get("kind", "selfies")
    if kind not in VOCABS:
        raise ValueError(f"{path}: unknown vocabulary kind {kind!r}; expected one of {sorted(VOCABS)}")
    return VOCABS[kind](d["tokens"], d["seq_len"])


def to_selfies(smiles: str) -> str | None:
    import selfies as sf

    c = canonical(smiles)
    if c is None:
        return None
    try:
        return sf.encoder(c)
    except Exception:  # noqa: BLE001 - selfies.EncoderError for unsupported valences
        return None
