"""bench/capstone_controls.py cannot rot: its core (one run, the report, the JSON notebook 09 reads) on a rehearsal of
two optimizer steps and two examples. The numbers mean nothing; only the shape and the bookkeeping are checked."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("capstone_controls",
                                              Path(__file__).parent.parent / "bench/capstone_controls.py")
controls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(controls)

RUN_KEYS = {"method", "quantize", "seed", "steps", "lora_alpha", "trainable_parameters", "final_parameters", "before",
            "after", "per_task", "curve", "ranks", "seconds"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    import torch

    workdir = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench's workers run (and cheaper on a shared machine)
    try:
        runs = [controls.one_run(method, True, 0, 2, 1, 2, workdir) for method in ("adalora", "lora")]
    finally:
        torch.set_num_threads(threads)
    matched = dict(runs[1], lora_alpha=controls.MATCHED_ALPHA)  # the report's bookkeeping only: not trained
    text = controls.report([*runs, matched], "a machine", "torch", 2, 2, [0], 1, 2, 1.0, 1)
    path = workdir / "controls.json"
    controls.write_json(path, runs, "a machine", "DEFAULT", "torch")
    return runs, text, json.loads(path.read_text())


def test_the_json_has_the_shape_notebook_09_reads(rehearsal):
    _, _, data = rehearsal
    assert set(data) == {"machine", "capability", "torch", "threads", "runs"} and data["threads"] == 1
    for run in data["runs"]:
        assert set(run) == RUN_KEYS, set(run) ^ RUN_KEYS
        assert run["lora_alpha"] == 12  # RunConfig's, for both methods
        for when in ("before", "after"):
            assert set(run[when]) == {"eval_loss", "exact_match"} and math.isfinite(run[when]["eval_loss"])
        assert [point["step"] for point in run["curve"]] == [1, 2]
        assert all(set(p) == {"step", "loss", "eval_loss"} and p["eval_loss"] is not None for p in run["curve"])
        assert run["per_task"] and all(0 <= v <= 1 for v in run["per_task"].values())


def test_the_parameters_and_ranks_are_counted_as_the_notebook_counts_them(rehearsal):
    _, _, data = rehearsal
    adalora, lora = data["runs"]
    # the tiny Llama: 4 layers; q, k, v, o are 128 x 128 (out + in = 256), gate and up 352 x 128, down 128 x 352 (480)
    assert lora["ranks"] is None and lora["final_parameters"] == lora["trainable_parameters"]
    assert lora["trainable_parameters"] == 4 * 4 * (4 * 256 + 3 * 480)  # r x (out + in) on 28 projections
    assert adalora["trainable_parameters"] == 6 * 4 * (4 * 257 + 3 * 481)  # init_r x (out + 1 + in)
    assert len(adalora["ranks"]) == 28 and sum(adalora["ranks"].values()) == 4 * 28  # target_r x 28, finally
    # each kept triplet: a column of P (out), λ (1) and a row of Q (in)
    assert adalora["final_parameters"] == sum(rank * (257 if ".self_attn." in name else 481)
                                              for name, rank in adalora["ranks"].items())


def test_the_report_has_every_table(rehearsal):
    _, text, _ = rehearsal
    for heading in ("machine: a machine", "== After training", "== AdaLoRA - LoRA", "== Exact match per task",
                    "== Validation loss during training", "== AdaLoRA's final ranks"):
        assert heading in text, text


def test_the_scaling_matched_lora_is_planned_and_reported(rehearsal):
    _, text, _ = rehearsal
    # LoRA's output scale lora_alpha / r equals AdaLoRA's lora_alpha / init_r (12 / 6) with lora_alpha 8
    assert controls.MATCHED_ALPHA / 4 == controls.ALPHA / 6
    planned = controls.planned_runs(150, 300, [0, 1, 2])
    assert len(planned) == len(set(planned)) == 21
    assert sorted(p for p in planned if p[4] != controls.ALPHA) == [("lora", True, s, 300, 8) for s in (0, 1, 2)]
    assert controls.run_key({"method": "lora", "quantize": True, "seed": 0, "steps": 2}) == ("lora", True, 0, 2, 12)
    assert "lora α=8 NF4 (QLoRA)" in text and "AdaLoRA - LoRA α=8 eval_loss" in text, text
