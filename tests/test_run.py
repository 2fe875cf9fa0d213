"""The shared run plumbing (``rewardopt/run.py``) and the steering output writer (``rewardopt/writers.py``):
per-rank random streams, the output-folder rule, the writer a steering method installs for itself, and
a steering method that computes without writing."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rewardopt.methods.best_of_n import BestOfN
from rewardopt.run import RunMixin, derived_seed, seeded_generator
from rewardopt.testing.toy import RandomWalkGenerator, SumReward


def trainer(**kw):
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                     **{"logger": False, **kw})


def loader(n=4, batch_size=2):
    return torch.utils.data.DataLoader(list(range(n)), batch_size=batch_size, collate_fn=list)


def walk_method(tmp_path=None, **kw):
    return BestOfN(RandomWalkGenerator(num_steps=3, dim=2), SumReward(), n=2, num_samples=2, seed=4,
                   output_dir=None if tmp_path is None else str(tmp_path), **kw)


# ---------------------------------------------------------------------------------------- seeds
def test_derived_streams_are_distinct_per_index_and_rank_and_repeat_on_resume():
    world = 3
    draws = {(i, r): torch.rand(4, generator=seeded_generator(7, i, r, world)) for i in range(20) for r in range(world)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws), "every (index, rank) its own stream"
    # a resumed run rebuilds the stream of micro-batch 12 on rank 2 from its index alone: the same draws
    assert torch.equal(torch.rand(4, generator=seeded_generator(7, 12, 2, world)), draws[12, 2])
    assert derived_seed(7, 3) == 7 * 1_000_003 + 3, "one process: the seeds the data sampler always used"


def test_steering_streams_follow_the_batch_and_the_rank():
    m = walk_method()
    m._trainer = SimpleNamespace(global_rank=1, world_size=2)
    rng, select = m.rngs(5)
    assert rng.initial_seed() == derived_seed(4, 5, 1, 2)
    assert select.initial_seed() == rng.initial_seed() + 2**40, "the method's own choices: a separate stream"


# ---------------------------------------------------------------------------------------- output folder
class _Module(RunMixin, L.LightningModule):
    def __init__(self, output_dir=None):
        super().__init__()
        self._output_dir = output_dir
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return self.output_dir


def test_output_dir_rule(tmp_path):
    assert str(_Module().output_dir) == "runs/unnamed", "no trainer, no argument: the class default"
    m = _Module()
    trainer(default_root_dir=str(tmp_path / "root")).predict(m, loader())
    assert m.output_dir == tmp_path / "root", "no logger: default_root_dir"
    m = _Module()
    logger = CSVLogger(str(tmp_path / "logs"), name="x", version="v")
    t = trainer(default_root_dir=str(tmp_path / "root"), logger=logger)
    t.predict(m, loader())
    assert m.output_dir == tmp_path / "logs" / "x" / "v", "a logger: its folder (trainer.log_dir)"
    m = _Module(str(tmp_path / "mine"))
    trainer(default_root_dir=str(tmp_path / "root")).predict(m, loader())
    assert m.output_dir == tmp_path / "mine", "the argument wins"


def test_output_dir_is_fixed_at_setup_so_rank_zero_alone_can_ask(tmp_path):
    """``trainer.log_dir`` is a collective (a broadcast) under DDP: the folder is resolved on every rank at
    setup, and later asking on rank 0 alone (summaries, grids) must not call it again."""
    m = _Module()
    t = trainer(default_root_dir=str(tmp_path))
    t.predict(m, loader())

    def no_collective(*a, **k):
        raise AssertionError("output_dir called a collective after setup")

    t.strategy.broadcast = no_collective
    assert m.output_dir == tmp_path


# ---------------------------------------------------------------------------------------- the writer
def writers(t):
    from rewardopt.writers import SteeringOutputWriter

    return [c for c in t.callbacks if isinstance(c, SteeringOutputWriter)]


def test_steering_method_installs_its_writer_once(tmp_path):
    m = walk_method(tmp_path)
    t = trainer()
    t.predict(m, loader())
    assert len(writers(t)) == 1 and (tmp_path / "summary.json").is_file()
    t.predict(m, loader())  # a second run on the same trainer: still one
    assert len(writers(t)) == 1


def test_a_user_configured_writer_is_used_not_duplicated(tmp_path):
    from rewardopt.writers import SteeringOutputWriter

    mine = SteeringOutputWriter(save_samples=False)
    m = walk_method(tmp_path)  # the method would save samples
    t = trainer(callbacks=[mine])
    t.predict(m, loader())
    assert writers(t) == [mine], "the user's writer, with the user's settings"
    assert (tmp_path / "summary.json").is_file() and not (tmp_path / "samples").exists()


def test_steering_predict_step_computes_and_writes_nothing(tmp_path):
    """The method holds the search and the counting only: without its writer it writes no file, and
    its predict step returns the per-sample records (and the samples, for a writer to save)."""
    m = walk_method(tmp_path)
    m.on_predict_start()
    out = m.predict_step([0, 1], 0)
    assert not any(tmp_path.iterdir()), "nothing written"
    records = out["records"]
    assert [(r["batch"], r["rank"], r["condition"], r["chain"]) for r in records] == \
        [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1)]
    assert [r["reward"] for r in records] == pytest.approx(out["samples"].sum(1).tolist())
    assert "diversity" in records[0]


def test_predictions_returned_without_samples_once_written(tmp_path):
    """The writer drops the samples from each prediction once they are on disk, so a long predict run
    does not hold every sample in memory; the records stay."""
    m = walk_method(tmp_path)
    preds = trainer().predict(m, loader(6, 2))
    assert len(preds) == 3 and all("samples" not in p and len(p["records"]) == 4 for p in preds)
    assert len(list((tmp_path / "samples").glob("*.jsonl"))) == 3
