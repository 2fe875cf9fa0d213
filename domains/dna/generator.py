"""``DNAGenerator``: masked discrete diffusion over A, C, G, T (+ [MASK]) with a BERT-style denoiser.

``pretrained``: a folder from ``save_pretrained`` (``denoiser/`` + ``dna.json``) or "embedded:tiny-dna",
trained by ``recipes/dna/pretrain_tiny.yaml`` on the project's JASPAR-planted corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from domains.dna.motifs import BASES
from rewardopt.generators.base import resolve_local_pretrained
from rewardopt.generators.capabilities import SavesPretrained, TextSerialisable
from rewardopt.generators.masked import MaskedDiffusionGenerator, tiny_denoiser

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-dna": ASSETS / "tiny_dna"}
MASK_ID = 4


def resolve_pretrained(pretrained: str) -> str:
    return resolve_local_pretrained(pretrained, EMBEDDED, "dna.json", "recipes/dna/pretrain_tiny.yaml")


class DNAGenerator(TextSerialisable, SavesPretrained, MaskedDiffusionGenerator):
    """Args:
        pretrained: "embedded:tiny-dna", a folder, or None (random model of ``seq_len``, for pretraining).
        num_steps: reverse steps (DRAKES: 128).
        seq_len, hidden, layers, arch, seed: the random model's shape (``tiny_denoiser``); the tiny
            default uses "roformer": rotary positions let it learn motifs planted at any offset.
        Other args: ``MaskedDiffusionGenerator``.
    """

    def __init__(self, pretrained: str | None = "embedded:tiny-dna", num_steps: int = 128, tau: float = 1.0,
                 full_finetune: bool = False, soft_steps: bool = False, seq_len: int = 64, hidden: int = 64,
                 layers: int = 2, arch: str = "roformer", seed: int = 0) -> None:
        if pretrained is not None:
            from transformers import AutoModelForMaskedLM

            path = resolve_pretrained(pretrained)
            seq_len = json.loads(Path(path, "dna.json").read_text())["seq_len"]
            denoiser = AutoModelForMaskedLM.from_pretrained(os.path.join(path, "denoiser")).eval()
        else:
            denoiser = tiny_denoiser(5, seq_len, hidden, layers, seed=seed, arch=arch)
        super().__init__(denoiser, mask_token_id=MASK_ID, seq_len=seq_len, num_steps=num_steps, tau=tau,
                         full_finetune=full_finetune, soft_steps=soft_steps)

    def to_text(self, x: torch.Tensor) -> list[str]:
        return ["".join(BASES[i] if i < 4 else "N" for i in row) for row in self.tokens(x).tolist()]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(path / "denoiser")
        (path / "dna.json").write_text(json.dumps({"seq_len": self.seq_len, "bases": BASES, "mask_id": MASK_ID}))
