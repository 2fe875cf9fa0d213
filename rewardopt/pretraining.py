"""What the pretraining modules share (masked diffusion, causal LMs): a ``NetworkFit`` with AdamW on
all of the generator's network (its ``network_attr``: ``denoiser``, ``lm``) and an optional warm-up /
linear decay, the held-out metric printed at each validation, and at the end
``generator.save_pretrained(output_dir)`` with ``generator_fit.json`` (steps, last held-out metric).
Subclasses implement ``training_step`` / ``validation_step`` and name their metric."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from rewardopt.fitting import NetworkFit
from rewardopt.generators.capabilities import SavesPretrained


class GeneratorPretraining(NetworkFit):
    """Args: generator (a ``FullyTrainedGenerator``); lr, weight_decay (AdamW); warmup_steps; decay (to
    5% at max_steps); output_dir (default: the trainer's log folder, ``default_root_dir`` without a logger)."""

    fit_name = "generator"
    metric = "val/loss"
    unit = ""

    def __init__(self, generator, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 decay: bool = False, output_dir: str | None = None) -> None:
        super().__init__(lr, weight_decay, warmup_steps, decay, output_dir)
        self.generator = generator
        self.network.requires_grad_(True).train()

    @property
    def network(self) -> nn.Module:
        """The generator's whole network, the one pretraining trains."""
        return getattr(self.generator, self.generator.network_attr)

    def fit_parameters(self):
        return self.network.parameters()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        v = self.last_val.get(self.metric)
        if v is not None and not self.trainer.sanity_checking:
            self.print(f"[rewardopt] step {self.global_step}: {self.metric} {v:.4f}{self.unit}")

    def save_weights(self, folder: Path) -> Path | None:
        """``generator.save_pretrained(folder)``; nothing for a generator that cannot save itself."""
        if not isinstance(self.generator, SavesPretrained):
            self.print(f"[rewardopt] {type(self.generator).__name__} is not SavesPretrained: the weights are not saved")
            return None
        self.network.eval()
        self.generator.save_pretrained(folder)
        return folder
