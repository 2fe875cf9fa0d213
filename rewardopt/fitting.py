"""One base for the modules that fit a small network and ship it: generator pretraining (masked
diffusion, causal LMs, the tiny text-to-image model), the shapes classifier, sequence surrogates,
value networks, the speech token model and recogniser.

``NetworkFit`` gives them AdamW on ``fit_parameters()`` with an optional warm-up / linear decay
(``rewardopt.schedules.warmup_decay``), one export folder argument (``output_dir``, resolved by
``RunMixin``), and one export at the end of training: on rank 0, the weights (``save_weights``) and
``<fit_name>_fit.json`` (the steps, ``fit_report()`` and where the weights went) in that folder.
Subclasses write ``training_step`` (and ``validation_step``), say what they train and how it is saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from rewardopt.run import RunMixin, write_json
from rewardopt.schedules import warmup_decay


class NetworkFit(RunMixin, L.LightningModule):
    """Fit a network and export it.

    Args:
        lr, weight_decay: AdamW (the default weight decay is torch's).
        warmup_steps: linear learning-rate warm-up; decay: then decay linearly to 5% at
            ``trainer.max_steps`` (``warmup_decay``).
        output_dir: where the weights and ``<fit_name>_fit.json`` go (default: the trainer's log
            folder, which is ``default_root_dir`` without a logger).
    """

    #: names the report, ``<fit_name>_fit.json``
    fit_name: ClassVar[str] = "model"

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 0, decay: bool = False,
                 output_dir: str | None = None) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup_steps, self.decay = lr, weight_decay, warmup_steps, decay
        self._output_dir = output_dir
        #: the last held-out scores (set at each validation); the report's default content
        self.last_val: dict[str, float] = {}

    # --- what a subclass provides -----------------------------------------------------------
    def fit_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimiser trains."""
        raise NotImplementedError(f"{type(self).__name__} does not say which parameters it trains (fit_parameters)")

    def save_weights(self, folder: Path) -> Path | None:
        """Write the trained weights under ``folder``; the file or folder written (None: nothing)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its weights are saved (save_weights)")

    def fit_report(self) -> dict[str, Any]:
        """What the report holds besides the steps and the weights' path: the last held-out scores."""
        return dict(self.last_val)

    # --- optimisation -----------------------------------------------------------------------
    def lr_schedule(self, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        """A Lightning scheduler config for ``opt``, or None for a constant learning rate."""
        total = 0
        if self.decay:
            total = int(self.trainer.max_steps)
            if total <= 0:
                raise ValueError(f"{type(self).__name__}(decay=true) decays the learning rate to 5% at "
                                 "trainer.max_steps; set trainer.max_steps")
        return warmup_decay(opt, self.warmup_steps, total)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.fit_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = self.lr_schedule(opt)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def held_out_metrics(self) -> dict[str, float]:
        """The ``val/`` metrics logged in the last validation."""
        return {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val = self.held_out_metrics()

    # --- export -----------------------------------------------------------------------------
    def on_train_end(self) -> None:
        folder = self.output_dir  # resolved on every rank: the trainer's log_dir is a collective call
        if self.is_global_zero():
            self.export(folder)

    def export(self, folder: Path) -> Path:
        """Write the weights and ``<fit_name>_fit.json`` into ``folder``; the report's path."""
        folder.mkdir(parents=True, exist_ok=True)
        weights = self.save_weights(folder)
        report = {"steps": int(self.global_step), **self.fit_report(),
                  "weights": None if weights is None else str(weights)}
        path = write_json(folder / f"{self.fit_name}_fit.json", report)
        self.print(f"[rewardopt] {type(self).__name__}: {report}; report: {path}")
        return path


# ----------------------------------------------------------------------------- small shipped networks
def save_module(module: nn.Module, path: str | Path) -> None:
    """``config.json`` (the constructor's arguments, ``module.config``) and ``model.safetensors``: the folder
    layout of the project's small reward / judge / classifier networks."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(module.config))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path / "model.safetensors"))


def read_module(path: str | Path, embedded: dict[str, Path], what: str, recipe: str) -> tuple[dict, dict]:
    """(config, state dict) of a ``save_module`` folder or an ``embedded:<name>`` id (-> its shipped folder);
    a FileNotFoundError naming ``what``, the shipped ids and the ``recipe`` that trains one otherwise."""
    import json

    from safetensors.torch import load_file

    folder = Path(embedded.get(str(path), path))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no {what} at {folder} (shipped: {', '.join(embedded)}); train one with "
                                f"`rewardopt fit --config {recipe}`")
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def load_module(cls, path: str | Path, embedded: dict[str, Path], recipe: str):
    """``cls(**config.json)`` with ``model.safetensors`` loaded, in eval mode (``read_module``)."""
    config, state = read_module(path, embedded, cls.__name__, recipe)
    model = cls(**config)
    model.load_state_dict(state)
    return model.eval()
