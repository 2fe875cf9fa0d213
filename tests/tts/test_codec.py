"""Speech corpus and codec: espeak-ng speech with the requested attributes, the codec round trip
(tokens -> audio -> tokens mostly unchanged), valid WAV files of the expected length."""

import wave

import pytest
import torch

from domains.tts.codec import HOP, N_FFT, N_MELS, SAMPLE_RATE, STACK, MelCodec, _mel_pinv, log_mel, write_wav
from domains.tts.corpus import ATTRIBUTES, espeak_available, sample_attributes, sentences, speak

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def test_sentences_and_attributes_are_seeded_and_balanced():
    assert sentences(20, seed=3) == sentences(20, seed=3) != sentences(20, seed=4)
    attrs = sample_attributes(400, seed=0)
    for key, values in ATTRIBUTES.items():
        share = sum(a[key] == values[0] for a in attrs) / len(attrs)
        assert 0.4 < share < 0.6
    assert all(a["voice"].startswith(a["gender"][0]) for a in attrs)  # m* voices are male, f* female


@needs_espeak
def test_espeak_speaks_with_the_requested_rate():
    slow = speak("the old horse sleeps at night", "m3", 50, 120)
    fast = speak("the old horse sleeps at night", "m3", 50, 240)
    assert slow.dtype.name == "float32" and 0.01 < abs(slow).max() <= 1.0
    assert len(slow) > 1.5 * len(fast) and len(fast) > 0.3 * SAMPLE_RATE
    with pytest.raises(ValueError, match="non-empty"):
        speak("  ")


@needs_espeak
def test_codec_round_trip_and_wav_files(tmp_path):
    texts = sentences(12, seed=1)
    mels = [log_mel(speak(t, v, 50, 170)) for t, v in zip(texts, ["m1", "f2"] * 6)]
    codec = MelCodec(32)
    stats = codec.fit(mels, iters=10)
    assert stats["codes_used"] == 32
    tokens = codec.encode(mels[0])
    assert tokens.shape == (-(-mels[0].shape[0] // STACK),) and tokens.max() < 32
    wav = codec.to_audio(tokens)
    again = codec.encode_audio(wav)
    n = min(len(tokens), len(again))
    assert abs(len(again) - len(tokens)) <= 1
    # Griffin-Lim phases: mostly, not exactly (128 codes, 300 utterances: 0.79)
    assert (tokens[:n] == again[:n]).float().mean() > 0.5
    codec.save(tmp_path / "codec")
    assert torch.equal(MelCodec.load(tmp_path / "codec").codebook, codec.codebook)
    path = write_wav(tmp_path / "a.wav", wav)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        assert abs(w.getnframes() - len(tokens) * STACK * HOP) <= HOP  # the tokens' duration


def test_log_mel_rejects_bad_audio():
    with pytest.raises(ValueError, match="mono waveform"):
        log_mel(torch.zeros(2, 4000))


def clustered_mels(centres: torch.Tensor, per_cluster: int, noise: float, seed: int = 0):
    """Log-mel "utterances" whose stacked groups are ``centres`` plus Gaussian noise, and each group's cluster."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(per_cluster)
    labels = labels[torch.randperm(len(labels), generator=g)]
    groups = centres[labels] + noise * torch.randn(len(labels), centres.shape[1], generator=g)
    mel = groups.reshape(-1, N_MELS)  # STACK frames per group
    return list(mel.split(10 * STACK)), labels


def test_fit_recovers_well_separated_clusters():
    centres = 4.0 * torch.randn(6, STACK * N_MELS, generator=torch.Generator().manual_seed(1))  # ~90 apart
    mels, labels = clustered_mels(centres, per_cluster=50, noise=0.3)
    codec = MelCodec(6)
    stats = codec.fit(mels, seed=0)
    assert stats["vectors"] == 300 and stats["codes_used"] == 6
    assert stats["mse_per_bin"] == pytest.approx(0.3 ** 2, rel=0.1)  # what is left is the noise
    nearest = torch.cdist(centres, codec.codebook).argmin(1)
    assert sorted(nearest.tolist()) == list(range(6))  # one code per cluster
    assert (codec.codebook[nearest] - centres).abs().max() < 0.3
    tokens = torch.cat([codec.encode(m) for m in mels])
    assert torch.equal(tokens, nearest[labels])  # every group gets its cluster's code
    assert codec.fit(mels, seed=0, max_vectors=120)["vectors"] == 120


def test_fit_survives_fewer_distinct_groups_than_codes():
    """Silence-padded corpora repeat groups: 3 distinct groups fit a codebook of 5, using 3 codes."""
    centres = torch.tensor([-11.5, 0.0, 3.0])[:, None].expand(3, STACK * N_MELS)
    mels, _ = clustered_mels(centres, per_cluster=20, noise=0.0)
    codec = MelCodec(5)
    stats = codec.fit(mels)
    assert stats["codes_used"] == 3 and stats["mse_per_bin"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="cannot fit a codebook of 5"):
        codec.fit([mels[0][:4 * STACK]])  # 4 groups


def test_mel_inversion_is_the_least_squares_solution_torchaudio_computes():
    """The cached pseudo-inverse gives torchaudio's ``InverseMelScale`` (least squares) answer."""
    import torchaudio

    mag = torch.rand(N_MELS, 40, generator=torch.Generator().manual_seed(0)) * 3
    ours = (_mel_pinv() @ mag).clamp(min=0)
    theirs = torchaudio.transforms.InverseMelScale(n_stft=N_FFT // 2 + 1, n_mels=N_MELS, sample_rate=SAMPLE_RATE)(mag)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
