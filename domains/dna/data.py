"""DNA pretraining data: the JASPAR-planted corpus as (B, L) token tensors (A=0, C=1, G=2, T=3)."""

from __future__ import annotations

import torch

from domains.dna.motifs import BASES, generate_corpus
from rewardopt.data import TokenDataModule


class DNADataModule(TokenDataModule):
    """Args: n: corpus size; seq_len; min_sites/max_sites: motif instances per sequence;
    batch_size; val_fraction; seed (corpus). The corpus is i.i.d., so its first rows are held out."""

    def __init__(self, n: int = 20_000, seq_len: int = 64, min_sites: int = 0, max_sites: int = 3, batch_size: int = 64,
                 val_fraction: float = 0.05, seed: int = 0) -> None:
        seqs = generate_corpus(n, seq_len, seed, max_sites=max_sites, min_sites=min_sites)
        data = torch.tensor([[BASES.index(c) for c in s] for s in seqs], dtype=torch.long)
        super().__init__(data, batch_size, val_fraction, seed, permute=False)
