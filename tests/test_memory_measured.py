"""plan_memory against the memory a real QLoRA + AdaLoRA run uses on this CPU; the streaming load's peak.

Each measurement runs in a fresh process (bench/memory_plan.py says how and why): the peak RSS it added while
loading and training, with glibc's mmap threshold fixed so that the RSS follows what the program holds.
"""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("memory_plan", Path(__file__).parent.parent / "bench/memory_plan.py")
memory_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_plan)

CASES = [("llama-58m", 2, 128), ("llama-217m", 1, 32)]  # about 58M and 217M parameters, vocabulary 32000
STEPS = 2  # the second step holds everything: optimizer states and importance scores exist from the first


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """All measurements at once, one process each, side by side."""
    directory = tmp_path_factory.mktemp("checkpoint")
    checkpoint_bytes, largest = memory_plan.write_checkpoint("llama-51m-v1k", directory)
    processes = [memory_plan.start("measure_training", *case, STEPS) for case in CASES]
    processes.append(memory_plan.start("measure_loading", str(directory)))
    results = [memory_plan.finish(process) for process in processes]
    return {"training": dict(zip(CASES, results, strict=False)), "loading": results[-1],
            "checkpoint": checkpoint_bytes, "largest": largest}


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-b{case[1]}-s{case[2]}")
def test_plan_predicts_the_measured_training_peak_within_15_percent(measured, case):
    plan = memory_plan.planned(*case)
    ratio = measured["training"][case]["peak"] / plan.peak
    assert 1 - memory_plan.TOLERANCE <= ratio <= 1 + memory_plan.TOLERANCE, (
        f"{case}: measured {measured['training'][case]['peak']:,} bytes, planned {plan.peak:,}\n{plan}")


def test_streaming_load_peak_is_the_quantized_model_plus_one_tensor(measured):
    loading, checkpoint, largest = measured["loading"], measured["checkpoint"], measured["largest"]
    assert checkpoint > 190e6 and loading["model"] < checkpoint / 5
    assert loading["peak"] <= 1.1 * (loading["model"] + largest) + 8 * 2**20, (loading, largest, checkpoint)
