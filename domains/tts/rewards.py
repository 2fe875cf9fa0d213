"""Rewards on codec tokens, trained by the project and frozen (DiffRO's reward models), and the
independent evaluation path on audio.

* ``CodecTokenModel``: an encoder over codec tokens (an embedding table that soft one-hots multiply,
  two convolutions, a bidirectional GRU) with a CTC head over characters (Token2Text) and one
  classification head per attribute (gender, pitch level, rate: the multi-task reward's stand-ins
  for emotion and style). ``TokenModelFit`` trains it on the shipped corpus.
* ``Token2TextReward``: log P(text | tokens) under the CTC head, per character (differentiable).
* ``AttributeReward``: log P(requested attribute | tokens) (differentiable); the requested value comes
  from the condition dict (``{"text": ..., "gender": "female"}``).
* ``AudioRecogniser``: a separate CTC recogniser on log-mel features of *audio*, trained on the
  espeak-ng recordings; the evaluation decodes tokens to audio (codec + Griffin-Lim) and transcribes
  it — never used as a reward. ``cer`` uses torchaudio's edit distance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from domains.tts.corpus import ATTRIBUTES
from domains.tts.data import CHARS, TTSVocab
from rewardopt.fitting import NetworkFit
from rewardopt.rewards.base import Reward

ASSETS = Path(__file__).parent / "assets"
TOKEN_MODEL = ASSETS / "token_model" / "model.pt"
RECOGNISER = ASSETS / "recogniser" / "model.pt"
BLANK = 0  # CTC blank; characters are 1..len(CHARS)


def char_targets(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated CTC targets (1-based character ids) and their lengths."""
    ids = [[CHARS.index(c) + 1 for c in t.lower() if c in CHARS] for t in texts]
    return torch.tensor([i for row in ids for i in row], dtype=torch.long), torch.tensor([len(r) for r in ids])


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best-path decoding of (B, T, C) CTC log-probabilities."""
    out = []
    for row, n in zip(log_probs.argmax(-1).tolist(), lengths.tolist()):
        chars, prev = [], BLANK
        for k in row[:n]:
            if k != prev and k != BLANK:
                chars.append(CHARS[k - 1])
            prev = k
        out.append("".join(chars))
    return out


def cer(hypotheses: list[str], references: list[str]) -> float:
    """Character error rate: Σ edit distance / Σ reference length (torchaudio)."""
    from torchaudio.functional import edit_distance

    errors = sum(edit_distance(list(r), list(h)) for h, r in zip(hypotheses, references))
    return errors / max(1, sum(len(r) for r in references))


class SequenceEncoder(nn.Module):
    """(B, T, D_in) features -> (B, T', H) with two convolutions and a bidirectional GRU; T' = T·up."""

    def __init__(self, d_in: int, hidden: int = 128, up: int = 1) -> None:
        super().__init__()
        self.up = up
        self.proj = nn.Linear(d_in, hidden)
        self.convs = nn.ModuleList([nn.Conv1d(hidden, hidden, 5, padding=2) for _ in range(2)])
        self.rnn = nn.GRU(hidden, hidden // 2, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).transpose(1, 2)
        for conv in self.convs:
            h = h + F.gelu(conv(h))
        h = h.transpose(1, 2)
        if self.up > 1:
            h = h.repeat_interleave(self.up, dim=1)
        return self.rnn(h)[0]


class CTCAttributeModel(nn.Module):
    """A ``SequenceEncoder`` with a CTC head over characters and one classifier head per attribute;
    saved as one file holding its constructor arguments and weights (``save`` / ``load``).
    Subclasses set ``default_path`` and the ``recipe`` that trains them."""

    default_path: Path
    recipe: str

    def __init__(self, d_in: int, hidden: int, up: int, **config: int) -> None:
        super().__init__()
        self.config = {"hidden": hidden, **config}
        self.encoder = SequenceEncoder(d_in, hidden, up=up)
        self.ctc = nn.Linear(hidden, len(CHARS) + 1)
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in ATTRIBUTES.items()})

    @classmethod
    def load(cls, path: str | Path | None = None):
        """The frozen model (eval mode, no gradients to its weights)."""
        path = Path(path or cls.default_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: train it with `rewardopt fit --config {cls.recipe}`")
        state = torch.load(path, map_location="cpu", weights_only=True)
        m = cls(**{k: v for k, v in state.items() if k != "weights"})
        m.load_state_dict(state["weights"])
        return m.eval().requires_grad_(False)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({**self.config, "weights": self.state_dict()}, path)


class CodecTokenModel(CTCAttributeModel):
    """Token2Text (CTC over characters, 2 frames per token) + attribute heads on codec tokens.
    Input: (B, N, K) one-hot or soft codec tokens; all-zero rows are no token (after EOS)."""

    default_path = TOKEN_MODEL
    recipe = "recipes/tts/train_token_model_tiny.yaml"

    def __init__(self, codebook_size: int = 128, hidden: int = 128) -> None:
        super().__init__(hidden, hidden, up=2, codebook_size=codebook_size)
        self.codebook_size = codebook_size
        self.embed = nn.Linear(codebook_size, hidden, bias=False)  # an embedding table soft tokens multiply

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(CTC log-probs (B, 2N, C+1), frame lengths (B,), attribute logits {name: (B, classes)})."""
        present = (codes.detach().sum(-1) > 0).float()  # (B, N)
        h = self.encoder(self.embed(codes.float()))
        m = present.repeat_interleave(2, dim=1).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        lengths = (present.sum(1) * 2).long()
        return torch.log_softmax(self.ctc(h), -1), lengths, {k: head(pooled) for k, head in self.heads.items()}


def _codec_slice(samples: torch.Tensor, vocab: TTSVocab) -> torch.Tensor:
    """(B, N, V_lm) LM one-hots -> (B, N, K) codec one-hots (EOS / padding rows become zeros)."""
    if samples.ndim != 3 or samples.shape[-1] != len(vocab):
        raise ValueError(f"expected codec-LM one-hots (B, N, {len(vocab)}); got {tuple(samples.shape)}")
    return samples[..., vocab.codec_offset:vocab.codec_offset + vocab.codebook_size]


def _text(cond: Any) -> str:
    if isinstance(cond, str):
        return cond
    if isinstance(cond, dict) and "text" in cond:
        return cond["text"]
    raise ValueError(f"a TTS reward needs the condition's text; got {cond!r}")


class Token2TextReward(Reward):
    """log P(text | codec tokens) / characters under the frozen CTC head (differentiable).

    An output too short to spell its text (fewer CTC frames — 2 per token — than the characters
    plus their doubled letters need) has an infinite CTC loss: its reward is ``too_short_reward``
    (nats per character; the default -10 is well below what random tokens of a real utterance's length
    score, about -3.4 to -5 with the shipped token model, though a long output for a very short text
    can score lower still) and it passes no gradient, so the batch's other rows keep
    finite gradients (``zero_infinity`` plus masking those rows).
    """

    differentiable = True

    def __init__(self, checkpoint: str = str(TOKEN_MODEL), too_short_reward: float = -10.0,
                 name: str | None = None) -> None:
        super().__init__(name or "token2text")
        self.model = CodecTokenModel.load(checkpoint)
        self.vocab = TTSVocab(self.model.codebook_size)
        self.too_short_reward = float(too_short_reward)

    def score(self, samples, cond):
        texts = [_text(c) for c in cond]
        log_probs, lengths, _ = self.model(_codec_slice(samples, self.vocab))
        targets, target_lengths = char_targets(texts)
        args = (log_probs.transpose(0, 1), targets, lengths.clamp(min=1), target_lengths)
        with torch.no_grad():
            infinite = torch.isinf(F.ctc_loss(*(a.detach() for a in args), blank=BLANK, reduction="none"))
        # zero_infinity: an infinite row's loss and gradient are 0 (without it its gradient is NaN,
        # and NaN times the 0 that masking gives it is still NaN)
        nll = F.ctc_loss(*args, blank=BLANK, reduction="none", zero_infinity=True)
        r = -nll / target_lengths.clamp(min=1).to(nll)
        return torch.where(infinite.to(r.device), torch.full_like(r, self.too_short_reward), r)


class AttributeReward(Reward):
    """log P(attribute = requested value | tokens) under the frozen head for ``attribute``."""

    differentiable = True

    def __init__(self, attribute: str = "gender", checkpoint: str = str(TOKEN_MODEL), name: str | None = None) -> None:
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}")
        super().__init__(name or f"attr_{attribute}")
        self.attribute = attribute
        self.model = CodecTokenModel.load(checkpoint)
        self.vocab = TTSVocab(self.model.codebook_size)

    def score(self, samples, cond):
        wanted = []
        for c in cond:
            if not isinstance(c, dict) or c.get(self.attribute) not in ATTRIBUTES[self.attribute]:
                raise ValueError(f"{self.name}: the condition must request {self.attribute} "
                                 f"(one of {ATTRIBUTES[self.attribute]}); got {c!r}")
            wanted.append(ATTRIBUTES[self.attribute].index(c[self.attribute]))
        _, _, logits = self.model(_codec_slice(samples, self.vocab))
        logp = torch.log_softmax(logits[self.attribute], -1)
        return logp.gather(1, torch.tensor(wanted, device=logp.device)[:, None]).squeeze(1)


class _SpeechModelFit(NetworkFit):
    """Shared by the two speech-model fits (``self.model``, a ``CTCAttributeModel``): at the end,
    ``model.pt`` and ``model_fit.json`` (steps and the last held-out scores) go to ``output_dir``
    (default: the trainer's log folder)."""

    def fit_parameters(self):
        return self.model.parameters()

    def save_weights(self, folder: Path) -> Path:
        self.model.save(folder / "model.pt")
        return folder / "model.pt"


class TokenModelFit(_SpeechModelFit):
    """Train ``CodecTokenModel`` on corpus items (CTC + attribute cross-entropy); writes
    ``model.pt`` and ``model_fit.json`` (held-out greedy CER and attribute accuracy) to ``output_dir``."""

    def __init__(self, codebook_size: int = 128, hidden: int = 128, lr: float = 2e-3, weight_decay: float = 0.01,
                 output_dir: str | None = None) -> None:
        super().__init__(lr, weight_decay, output_dir=output_dir)
        self.model = CodecTokenModel(codebook_size, hidden)
        self.val: list[dict] = []

    def _batch(self, items: list[dict]) -> torch.Tensor:
        N = max(len(i["codes"]) for i in items)
        x = torch.zeros(len(items), N, self.model.codebook_size)
        for b, i in enumerate(items):
            x[b, torch.arange(len(i["codes"])), torch.tensor(i["codes"])] = 1
        return x

    def losses(self, items: list[dict]) -> tuple[torch.Tensor, dict]:
        log_probs, lengths, logits = self.model(self._batch(items))
        targets, target_lengths = char_targets([i["text"] for i in items])
        ctc = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=BLANK, zero_infinity=True)
        ce = sum(F.cross_entropy(logits[k], torch.tensor([ATTRIBUTES[k].index(i[k]) for i in items]))
                 for k in ATTRIBUTES)
        return ctc + ce, {"log_probs": log_probs, "lengths": lengths, "logits": logits}

    def training_step(self, items, batch_idx):
        loss, _ = self.losses(items)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(items))
        return loss

    def validation_step(self, items, batch_idx):
        _, out = self.losses(items)
        hyp = greedy_ctc(out["log_probs"], out["lengths"])
        acc = {k: (out["logits"][k].argmax(-1)
                   == torch.tensor([ATTRIBUTES[k].index(i[k]) for i in items])).float().tolist()
               for k in ATTRIBUTES}
        self.val.append({"hyp": hyp, "ref": [i["text"] for i in items], "acc": acc})

    def on_validation_epoch_end(self):
        if not self.val:
            return
        hyp = [h for v in self.val for h in v["hyp"]]
        ref = [r for v in self.val for r in v["ref"]]
        self.last_val = {"cer": cer(hyp, ref), **{f"acc_{k}": sum(a for v in self.val for a in v["acc"][k]) / len(hyp)
                                                  for k in ATTRIBUTES}}
        self.val = []
        self.log("val/cer", self.last_val["cer"], prog_bar=True)
        self.print(f"[rewardopt] step {self.global_step}: {self.last_val}")



class AudioRecogniser(CTCAttributeModel):
    """CTC recogniser and attribute classifier on log-mel features of audio (the evaluation path;
    never a reward): (B, T, N_MELS) -> (B, T/2, C+1) log-probabilities (frames pooled in pairs) and
    attribute logits from the mean-pooled encoding."""

    default_path = RECOGNISER
    recipe = "recipes/tts/train_recogniser_tiny.yaml"

    def __init__(self, n_mels: int = 64, hidden: int = 128) -> None:
        super().__init__(2 * n_mels, hidden, up=1, n_mels=n_mels)
        self.n_mels = n_mels

    def forward(self, mels: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        T = mels.shape[1] - mels.shape[1] % 2
        x = mels[:, :T].reshape(mels.shape[0], T // 2, 2 * self.n_mels)
        x = (x + 6.0) / 4.0  # log-mel magnitudes are about -11..2: centre and scale
        h = self.encoder(x)
        out_lengths = (lengths // 2).clamp(max=T // 2)
        m = (torch.arange(h.shape[1])[None] < out_lengths[:, None]).float().unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.log_softmax(self.ctc(h), -1), out_lengths, {k: head(pooled) for k, head in self.heads.items()}

    @torch.no_grad()
    def transcribe(self, wavs: list[torch.Tensor]) -> tuple[list[str], dict[str, list[str]]]:
        """Waveforms (22,050 Hz) -> (texts, {attribute: predicted values})."""
        from domains.tts.codec import log_mel

        mels = [log_mel(w) if len(w) >= 1024 else torch.full((2, self.n_mels), -11.5) for w in wavs]
        lengths = torch.tensor([len(m) for m in mels])
        x = nn.utils.rnn.pad_sequence(mels, batch_first=True, padding_value=-11.5)
        log_probs, out_lengths, logits = self(x, lengths)
        attrs = {k: [ATTRIBUTES[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}
        return greedy_ctc(log_probs, out_lengths), attrs


class RecogniserFit(_SpeechModelFit):
    """Train the ``AudioRecogniser`` on (log-mel, corpus item) pairs (CTC on the text + attribute
    cross-entropy); a share of each batch goes through the codec (encode -> codebook mels) so it
    also reads codec-quantised speech. Writes ``model.pt`` and ``model_fit.json`` (held-out CER and
    attribute accuracy on real and on codec-quantised mels)."""

    def __init__(self, hidden: int = 128, lr: float = 2e-3, weight_decay: float = 0.01, codec_augment: float = 0.5,
                 output_dir: str | None = None) -> None:
        super().__init__(lr, weight_decay, output_dir=output_dir)
        self.model, self.codec_augment = AudioRecogniser(hidden=hidden), codec_augment
        self.val: list[tuple[list[str], list[str]]] = []
        self._codec = None

    @property
    def codec(self):
        if self._codec is None:
            from domains.tts.codec import MelCodec
            from domains.tts.data import CODEC

            self._codec = MelCodec.load(CODEC)
        return self._codec

    def _loss(self, items: list[tuple[torch.Tensor, dict]], quantise: bool):
        mels = [self.codec.decode_mel(self.codec.encode(m.float())) if quantise else m.float() for m, _ in items]
        lengths = torch.tensor([len(m) for m in mels])
        padded = nn.utils.rnn.pad_sequence(mels, batch_first=True, padding_value=-11.5)
        log_probs, out_lengths, logits = self.model(padded, lengths)
        targets, target_lengths = char_targets([i["text"] for _, i in items])
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths, blank=BLANK,
                          zero_infinity=True)
        labels = {k: torch.tensor([ATTRIBUTES[k].index(i[k]) for _, i in items]) for k in ATTRIBUTES}
        loss = loss + sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)
        acc = {k: (logits[k].argmax(-1) == labels[k]).float().tolist() for k in ATTRIBUTES}
        return loss, log_probs, out_lengths, acc

    def training_step(self, items, batch_idx):
        k = int(len(items) * self.codec_augment)
        loss = self._loss(items[k:], False)[0] + (self._loss(items[:k], True)[0] if k else 0.0)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(items))
        return loss

    def validation_step(self, items, batch_idx):
        refs = [i["text"] for _, i in items]
        for quantise in (False, True):
            _, lp, n, acc = self._loss(items, quantise)
            self.val.append((greedy_ctc(lp, n), refs, quantise, acc))

    def on_validation_epoch_end(self):
        if not self.val:
            return
        res = {}
        for q, key in ((False, "real"), (True, "codec")):
            rows = [v for v in self.val if v[2] == q]
            res[f"cer_{key}"] = cer([h for v in rows for h in v[0]], [r for v in rows for r in v[1]])
            for k in ATTRIBUTES:
                accs = [a for v in rows for a in v[3][k]]
                res[f"acc_{k}_{key}"] = sum(accs) / max(1, len(accs))
        self.val, self.last_val = [], res
        self.log("val/cer", res["cer_real"], prog_bar=True)
        self.print(f"[rewardopt] step {self.global_step}: {res}")

