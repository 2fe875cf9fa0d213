"""What the pretraining modules share (masked diffusion, causal LMs): AdamW on all of the
generator's network (``generator.denoiser``) with an optional warm-up / linear decay, the held-out
metric printed at each validation, and ``generator.save_pretrained(output_dir)`` at the end.
Subclasses implement ``training_step`` / ``validation_step`` and name their metric."""

from __future__ import annotations

import lightning as L
import torch

from rewardopt.schedules import warmup_decay


class GeneratorPretraining(L.LightningModule):
    """Args: generator; lr, weight_decay (AdamW); warmup_steps; decay (to 5% at max_steps);
    output_dir (default: trainer.default_root_dir)."""

    metric = "val/loss"
    unit = ""

    def __init__(self, generator, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 decay: bool = False, output_dir: str | None = None) -> None:
        super().__init__()
        self.generator, self.lr, self.weight_decay, self._output_dir = generator, lr, weight_decay, output_dir
        self.warmup_steps, self.decay = warmup_steps, decay
        generator.denoiser.requires_grad_(True).train()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.generator.denoiser.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_decay(opt, self.warmup_steps, int(self.trainer.max_steps) if self.decay else 0)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def on_validation_epoch_end(self) -> None:
        v = self.trainer.callback_metrics.get(self.metric)
        if v is not None and not self.trainer.sanity_checking:
            self.print(f"[rewardopt] step {self.global_step}: {self.metric} {float(v):.4f}{self.unit}")

    def on_train_end(self) -> None:
        save = getattr(self.generator, "save_pretrained", None)
        if save is not None and self.trainer.is_global_zero:
            out = self._output_dir or self.trainer.default_root_dir
            self.generator.denoiser.eval()
            save(out)
            self.print(f"[rewardopt] saved the pretrained model to {out}")
