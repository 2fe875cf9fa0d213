"""A speech corpus the project makes offline: Debian's ``espeak-ng`` speaks short sentences with
varied voices, pitch and rate, and those settings are the labels the multi-task reward learns.

* sentences: "<determiner> <adjective> <noun> <verb> <adverb>" from fixed word lists (seeded);
* gender: espeak-ng's male (m1, m3, m5, m7) and female (f1, f2, f3, f4) voice variants;
* pitch level: ``-p`` 25 (low) or 70 (high); rate: ``-s`` 130 (slow) or 200 (fast) words/minute.

``speak`` returns a float waveform at 22,050 Hz. ``build_corpus`` speaks n sentences and keeps
their log-mel features (``domains.tts.codec.log_mel``), not the audio, so it stays small.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

SAMPLE_RATE = 22_050
DETERMINERS = ["the", "a", "my", "your", "this", "that", "one", "every"]
ADJECTIVES = ["small", "big", "red", "green", "quiet", "loud", "happy", "old", "new", "fast", "slow", "warm",
              "cold", "bright", "dark", "tall"]
NOUNS = ["dog", "cat", "bird", "car", "boat", "child", "farmer", "river", "train", "robot", "tree", "house",
         "horse", "teacher", "window", "garden"]
VERBS = ["runs", "sings", "waits", "jumps", "turns", "sleeps", "moves", "falls", "shines", "calls", "stops",
         "grows"]
ADVERBS = ["today", "again", "slowly", "quickly", "at night", "in the rain", "near home", "once more", "alone",
           "together"]
VOICES = {"male": ["m1", "m3", "m5", "m7"], "female": ["f1", "f2", "f3", "f4"]}
PITCH = {"low": 25, "high": 70}
RATE = {"slow": 130, "fast": 200}
ATTRIBUTES = {"gender": list(VOICES), "pitch": list(PITCH), "rate": list(RATE)}


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def sentences(n: int, seed: int = 0) -> list[str]:
    """n short sentences (seeded; repeats are possible but rare: 8·16·16·12·10 = 245,760 combinations)."""
    rng = np.random.default_rng(seed)
    parts = (DETERMINERS, ADJECTIVES, NOUNS, VERBS, ADVERBS)
    return [" ".join(p[rng.integers(len(p))] for p in parts) for _ in range(n)]


def speak(text: str, voice: str = "m3", pitch: int = 50, rate: int = 175) -> np.ndarray:
    """espeak-ng's English speech for ``text``: float32 samples in [-1, 1] at 22,050 Hz."""
    if not espeak_available():
        raise FileNotFoundError("espeak-ng is not installed: `apt-get install espeak-ng` (Debian/Ubuntu), "
                                "or use the shipped corpus tokens (domains/tts/assets)")
    if not text.strip():
        raise ValueError("speak() needs non-empty text")
    cmd = ["espeak-ng", "-v", f"en+{voice}", "-p", str(int(pitch)), "-s", str(int(rate)), "--stdout", text]
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    # --stdout writes a streaming WAV header (44 bytes, unknown length): the samples follow it
    pcm = np.frombuffer(out[44:len(out) - (len(out) - 44) % 2], dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def sample_attributes(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Balanced random (gender, voice, pitch, rate) settings for n utterances."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(n):
        gender = ATTRIBUTES["gender"][rng.integers(2)]
        out.append({"gender": gender, "voice": VOICES[gender][rng.integers(len(VOICES[gender]))],
                    "pitch": ATTRIBUTES["pitch"][rng.integers(2)], "rate": ATTRIBUTES["rate"][rng.integers(2)]})
    return out


def build_corpus(n: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Speak n sentences with random attributes; each item: text, gender, voice, pitch, rate and
    ``mel`` (frames, n_mels) float32 log-mel features."""
    from domains.tts.codec import log_mel

    texts, attrs = sentences(n, seed), sample_attributes(n, seed)
    items = []
    it = zip(texts, attrs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, desc="espeak-ng corpus")
    for text, a in it:
        wav = speak(text, a["voice"], PITCH[a["pitch"]], RATE[a["rate"]])
        items.append({"text": text, **a, "mel": log_mel(wav).numpy()})
    return items
