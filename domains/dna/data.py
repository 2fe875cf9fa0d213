"""DNA pretraining data: the JASPAR-planted corpus as (B, L) token tensors (A=0, C=1, G=2, T=3)."""

from __future__ import annotations

import lightning as L
import torch

from domains.dna.motifs import BASES, generate_corpus


class DNADataModule(L.LightningDataModule):
    """Args: n: corpus size; seq_len; batch_size; val_fraction; seed (corpus and split)."""

    def __init__(self, n: int = 20_000, seq_len: int = 64, batch_size: int = 64, val_fraction: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        seqs = generate_corpus(n, seq_len, seed)
        data = torch.tensor([[BASES.index(c) for c in s] for s in seqs], dtype=torch.long)
        n_val = max(1, int(val_fraction * n))
        self.val, self.train = data[:n_val], data[n_val:]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=256)
