"""Multi-node DDP as users launch it: one `torchrun` per node (static rendezvous on 127.0.0.1, one
process per node), each starting the installed `rewardopt fit ... --trainer.num_nodes 2` from its own
directory. The job keeps both ranks' weights identical, reduces the logged reward over the nodes and
writes one summary — what the single-node 2-process test checks (tests/test_recipes.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(cwd: Path, rewardopt_args: list[str], nnodes: int = 2) -> list[tuple[int, str]]:
    """Start one `torchrun ... rewardopt <args>` per node, side by side; (exit code, output) of each.
    If a node fails, the others (waiting for it at a collective) are stopped."""
    port = free_port()
    procs = []
    for node_rank in range(nnodes):
        node_dir = cwd / f"node{node_rank}"
        node_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "torchrun"), "--nnodes", str(nnodes), "--nproc_per_node", "1", "--node_rank", str(node_rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--no-python", str(BIN / "rewardopt"), *rewardopt_args]
        procs.append(subprocess.Popen(cmd, cwd=node_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [(p.wait(), p.stdout.read()) for p in procs]


# (recipe, extra flags): LoRA fine-tuning of the tiny text-to-image model (DRaFT), and full fine-tuning
# of the tiny masked-diffusion DNA model with a frozen copy for the KL (DRAKES, `full_finetune: true`)
RUNS = {
    "draft_lora": ("recipes/images/draft_k_tiny.yaml", ["--trainer.max_steps", "3",
                                                         "--data.init_args.val_repeats", "1"]),
    "drakes_full": ("recipes/dna/drakes_oracle_tiny.yaml", ["--trainer.max_steps", "2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_two_nodes_by_torchrun_keep_weights_in_sync_and_write_one_summary(run, tmp_path):
    """Outputs go to relative paths, so each node writes into its own directory (as on its own disk)."""
    recipe, extra = RUNS[run]
    nodes = torchrun_nodes(tmp_path, [
        "fit", "--config", str(ROOT / recipe), "--trainer.num_nodes", "2", "--trainer.devices", "1",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.callbacks", "[]",
        "--trainer.default_root_dir", "root", "--trainer.logger.init_args.save_dir", "logs",
        "--model.init_args.output_dir", "out", "--trainer.enable_progress_bar", "false", *extra])
    for node_rank, (rc, log) in enumerate(nodes):
        assert rc == 0, f"node {node_rank}:\n{log[-4000:]}"
        assert f"GLOBAL_RANK: {node_rank}, MEMBER: {node_rank + 1}/2" in log, "one process per node, in node order"
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("summary.json")] == [Path("node0/out/summary.json")]
    assert [log.count("[rewardopt] summary:") for _, log in nodes] == [1, 0], "node 0 reports, once"
    s = json.loads((tmp_path / "node0/out/summary.json").read_text())
    assert s["world_size"] == 2
    assert s["steps"] == int(extra[extra.index("--trainer.max_steps") + 1]), "the nodes trained"
    assert len(s["param_checksums"]) == 2 and s["ranks_in_sync"], s["param_checksums"]
    per_rank = s["last_train_reward_per_rank"]
    assert per_rank[0] != per_rank[1], "the nodes see different prompts and noise"
    assert s["last_train_reward_reduced"] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
