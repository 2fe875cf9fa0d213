"""A speech codec the project trains: log-mel frames (torchaudio) stacked in groups of ``STACK``
and vector-quantised by a k-means codebook (scikit-learn's ``KMeans``) -> one token per group
(~21.5 tokens per second). Decoding: codebook vector -> log-mel frames -> linear magnitude (the
least-squares, minimum-norm solution through the mel filterbank's pseudo-inverse, computed once:
what torchaudio's ``InverseMelScale`` solves per call with ``torch.linalg.lstsq``) -> waveform
(torchaudio Griffin-Lim), so every generated token sequence can be listened to.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

SAMPLE_RATE, N_FFT, HOP, N_MELS, STACK = 22_050, 1024, 256, 64, 4
FLOOR = 1e-5  # log-mel of silence = log(FLOOR)


@lru_cache(maxsize=1)
def _mel():
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS,
                                                power=1.0)


@lru_cache(maxsize=1)
def _mel_pinv() -> torch.Tensor:
    """(n_freqs, N_MELS) pseudo-inverse of the mel filterbank (the same filters ``_mel`` uses).

    ``_mel_pinv() @ mel`` is the minimum-norm least-squares linear spectrum: the answer of torchaudio's
    ``InverseMelScale`` (the filterbank has full rank), without re-solving it for every utterance."""
    fb = _mel().mel_scale.fb  # (n_freqs, N_MELS)
    return torch.linalg.pinv(fb.T)


def log_mel(wav) -> torch.Tensor:
    """(samples,) waveform at 22,050 Hz -> (frames, N_MELS) log-mel magnitudes."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.ndim != 1 or wav.numel() < N_FFT:
        raise ValueError(f"expected a mono waveform of at least {N_FFT} samples; got shape {tuple(wav.shape)}")
    return torch.log(_mel()(wav).clamp(min=FLOOR)).T.contiguous()


def stack(mel: torch.Tensor) -> torch.Tensor:
    """(frames, M) -> (ceil(frames / STACK), STACK * M), the last group padded with silence."""
    pad = (-mel.shape[0]) % STACK
    if pad:
        mel = torch.cat([mel, mel.new_full((pad, mel.shape[1]), float(torch.log(torch.tensor(FLOOR))))])
    return mel.reshape(-1, STACK * mel.shape[1])


class MelCodec(nn.Module):
    """Args: codebook_size K; ``codebook`` (K, STACK·N_MELS) when loading."""

    def __init__(self, codebook_size: int = 128, codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        cb = codebook if codebook is not None else torch.zeros(codebook_size, STACK * N_MELS)
        self.register_buffer("codebook", cb.float())

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def fit(self, mels: list[torch.Tensor], iters: int = 25, seed: int = 0, max_vectors: int = 60_000) -> dict:
        """k-means over the stacked frames of ``mels`` (scikit-learn's ``KMeans``: greedy k-means++
        seeding, at most ``iters`` Lloyd iterations; at most ``max_vectors`` groups, drawn with
        ``seed``); returns the fit statistics: vectors, mean squared error per bin, codes used (codes
        with members; fewer distinct groups than codes leave duplicate, unused codes)."""
        from sklearn.cluster import KMeans

        data = torch.cat([stack(torch.as_tensor(m, dtype=torch.float32)) for m in mels])
        g = torch.Generator().manual_seed(seed)
        if len(data) > max_vectors:
            data = data[torch.randperm(len(data), generator=g)[:max_vectors]]
        K = self.size
        if len(data) < K:
            raise ValueError(f"{len(data)} vectors cannot fit a codebook of {K}")
        km = KMeans(n_clusters=K, init="k-means++", n_init=1, max_iter=iters, random_state=seed)
        km.fit(data.numpy())  # fewer distinct groups than codes: a ConvergenceWarning, duplicate codes
        self.codebook.copy_(torch.from_numpy(km.cluster_centers_).float())
        return {"vectors": len(data), "mse_per_bin": float(km.inertia_) / len(data) / STACK / N_MELS,
                "codes_used": len(set(km.labels_.tolist()))}

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(frames, N_MELS) log-mel -> (groups,) token ids."""
        return torch.cdist(stack(torch.as_tensor(mel, dtype=torch.float32)), self.codebook).argmin(1)

    def encode_audio(self, wav) -> torch.Tensor:
        return self.encode(log_mel(wav))

    def decode_mel(self, tokens: torch.Tensor) -> torch.Tensor:
        """(groups,) ids -> (groups·STACK, N_MELS) log-mel."""
        return self.codebook[torch.as_tensor(tokens, dtype=torch.long)].reshape(-1, N_MELS)

    def to_audio(self, tokens: torch.Tensor, n_iter: int = 32, seed: int = 0) -> torch.Tensor:
        """(groups,) ids -> waveform (samples,) at 22,050 Hz via inverse mel + Griffin-Lim."""
        import torchaudio

        mag_mel = self.decode_mel(tokens).exp().T  # (N_MELS, frames)
        lin = (_mel_pinv() @ mag_mel).clamp(min=0)  # least-squares linear magnitudes
        torch.manual_seed(seed)  # Griffin-Lim starts from random phases
        gl = torchaudio.transforms.GriffinLim(n_fft=N_FFT, hop_length=HOP, power=1.0, n_iter=n_iter)
        wav = gl(lin)
        return wav / wav.abs().max().clamp(min=1e-6) * 0.9

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.codebook.clone(), path / "codebook.pt")
        (path / "codec.json").write_text(json.dumps({"codebook_size": self.size, "sample_rate": SAMPLE_RATE,
                                                     "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "stack": STACK}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MelCodec":
        cfg = json.loads(Path(path, "codec.json").read_text())
        if (cfg["n_mels"], cfg["stack"], cfg["hop"]) != (N_MELS, STACK, HOP):
            raise ValueError(f"{path}: codec settings {cfg} differ from this version's")
        return cls(cfg["codebook_size"], torch.load(Path(path, "codebook.pt"), weights_only=True))


def write_wav(path: str | os.PathLike, wav: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM mono WAV (the standard library's ``wave``; no extra dependency)."""
    import wave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (torch.as_tensor(wav).clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return path
