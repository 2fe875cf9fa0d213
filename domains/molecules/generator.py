"""``MoleculeGenerator``: masked discrete diffusion over SELFIES tokens with a BERT-style denoiser.

``pretrained`` is a folder written by ``save_pretrained`` (``denoiser/`` in transformers format +
``vocab.json``) or "embedded:tiny-nci", the tiny model ``recipes/molecules/pretrain_tiny.yaml``
trains on RDKit's NCI sample (shipped in ``domains/molecules/assets/tiny_nci``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from domains.molecules.chem import load_vocab
from rewardopt.generators.base import resolve_local_pretrained
from rewardopt.generators.capabilities import Renderable, SavesPretrained, TextSerialisable
from rewardopt.generators.masked import MaskedDiffusionGenerator, tiny_denoiser

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-nci": ASSETS / "tiny_nci"}


def resolve_pretrained(pretrained: str) -> str:
    return resolve_local_pretrained(pretrained, EMBEDDED, "vocab.json", "recipes/molecules/pretrain_tiny.yaml")


class MoleculeGenerator(TextSerialisable, Renderable, SavesPretrained, MaskedDiffusionGenerator):
    """Args:
        pretrained: "embedded:tiny-nci", or a folder from ``save_pretrained``; None with ``vocab``
            (a vocab.json path, e.g. ``domains/molecules/assets/nci_vocab.json``) and
            ``hidden``/``layers`` builds a random model (for pretraining).
        num_steps: reverse steps (DRAKES: 128).
        Other args: ``MaskedDiffusionGenerator``.
    """

    def __init__(self, pretrained: str | None = "embedded:tiny-nci", num_steps: int = 128, tau: float = 1.0,
                 full_finetune: bool = False, soft_steps: bool = False, vocab: str | None = None,
                 hidden: int = 64, layers: int = 2, seed: int = 0) -> None:
        if pretrained is not None:
            from transformers import AutoModelForMaskedLM

            path = resolve_pretrained(pretrained)
            vocab = load_vocab(os.path.join(path, "vocab.json"))
            denoiser = AutoModelForMaskedLM.from_pretrained(os.path.join(path, "denoiser")).eval()
        else:
            if vocab is None:
                raise ValueError("pretrained=None builds a random model and needs vocab (a vocab.json path)")
            vocab = load_vocab(vocab)
            denoiser = tiny_denoiser(len(vocab), vocab.seq_len, hidden, layers, seed=seed)
        super().__init__(denoiser, mask_token_id=vocab.mask_id, seq_len=vocab.seq_len, num_steps=num_steps, tau=tau,
                         full_finetune=full_finetune, soft_steps=soft_steps)
        self.vocab = vocab

    def smiles(self, x: torch.Tensor) -> list[str | None]:
        """Canonical SMILES of each sequence (None if invalid)."""
        return [self.vocab.decode(ids) for ids in self.tokens(x).tolist()]

    def to_text(self, x: torch.Tensor) -> list[str]:
        """One line per sample for saved outputs: canonical SMILES, or "<invalid>"."""
        return [s if s is not None else "<invalid>" for s in self.smiles(x)]

    def render(self, samples: torch.Tensor, size: int = 160) -> torch.Tensor:
        """RDKit 2-D drawings (N, 3, size, size) in [0, 1]; an invalid sequence is a grey square."""
        import numpy as np
        from rdkit import Chem
        from rdkit.Chem import Draw

        pictures = []
        for smi in self.smiles(samples):
            mol = Chem.MolFromSmiles(smi) if smi is not None else None
            if mol is None:
                pictures.append(np.full((size, size, 3), 200, dtype=np.uint8))
            else:
                pictures.append(np.asarray(Draw.MolToImage(mol, size=(size, size)).convert("RGB")))
        return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(path / "denoiser")
        self.vocab.save(path / "vocab.json")
