"""Data parallel on the CPU: `torchrun --nproc_per_node 2 -m minilora tune` with the gloo backend trains what one
process trains with the same global batch, and the processes' masks are checked to agree at every masking step."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minilora import distributed

ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")
STEPS = 40
# Measured (2-core AVX-512 Xeon, one thread per process): losses within 2e-7 relative, weights within 1e-6 of a
# largest weight of 0.25, the same rank pattern. They differ only in where float sums round: DDP adds the two
# processes' gradients (each with the orthogonal penalty's) and halves the sum; one process adds halves in one backward.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def tune(out, *options, processes=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "minilora", "tune", "--steps", str(STEPS),
               "--eval-examples", "4", "--output-dir", str(out), "--no-progress", *options]
    done = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    return done.stdout, log, load_file(out / "adapter" / "minilora_adapter.safetensors")


def test_two_processes_train_what_one_trains_with_the_same_global_batch(tmp_path):
    """2 processes x batch 4 against 1 process x batch 4 x 2 micro-batches: the same 8 examples per step (each
    process takes every other batch of the same seeded order), so the same run up to rounding."""
    stdout, ddp, ddp_weights = tune(tmp_path / "ddp", "--batch-size", "4", processes=2)
    _, single, single_weights = tune(tmp_path / "single", "--batch-size", "4", "--grad-accum", "2")
    assert stdout.count("held-out loss") == 1, "process 0 alone reports"
    assert len(ddp["log"]) == len(single["log"]) == STEPS
    for a, b in zip(ddp["log"], single["log"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
        assert a["budget"] == b["budget"]
    assert ddp["summary"]["rank_history"] == single["summary"]["rank_history"], "the masks at every masking step"
    assert ddp_weights.keys() == single_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(weight, single_weights[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


def check_agreement(rank, world, init_file, answers):
    """In process `rank` of a gloo group: same_everywhere on a pattern that agrees, then on one that does not."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        distributed.same_everywhere({"q_proj": [True, False]}, "the rank pattern at step 3")
        try:
            distributed.same_everywhere({"q_proj": [True, rank == 0]}, "the rank pattern at step 4")
        except RuntimeError as error:
            answers.put((rank, str(error)))
        else:
            answers.put((rank, None))
    finally:
        dist.destroy_process_group()


def test_processes_whose_masks_differ_stop_with_the_step_named():
    """The check the training loop runs at each mask: it must notice a difference, on every process."""
    context = mp.get_context("spawn")
    answers = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(check_agreement, args=(2, os.path.join(directory, "init"), answers), nprocs=2,
                           start_method="spawn")
        found = dict(answers.get(timeout=60) for _ in range(2))
    for rank in (0, 1):
        assert found[rank] and "the rank pattern at step 4 differs between process 0 and process 1" in found[rank]


def test_one_process_is_the_whole_world():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.mean(2.5) == 2.5 and distributed.gather("x") == ["x"] and distributed.any_rank(True)
    assert distributed.start("cpu") == "cpu"  # without torchrun's WORLD_SIZE, no process group
