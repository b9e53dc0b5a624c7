"""bench/gpu_check.py cannot rot without a GPU: its --reduced rehearsal runs every part on the CPU.

The numbers of a rehearsal mean nothing (a tiny model, three steps), so only their presence and finiteness are
checked, never a time or a memory figure; plus one fact that holds anywhere: both stacks start from the same
weights and batch, so their first losses agree.
"""

import math
import re
import subprocess
import sys

NUMBER = r"[-+]?(?:\d+(?:\.\d+)?|nan|inf)"
LABELS = [  # (a line's label, how many lines carry it): each must be followed by finite numbers only
    ("load:", 2),
    ("training: peak memory", 2),
    ("seconds per step:", 3),  # each stack, and their ratio
    ("loss (task + γ·orthogonal penalty):", 2),
    ("measured / predicted =", 1),
    ("training peak memory:", 1),
    ("load peak memory:", 1),
    ("held-out loss:", 1),
    ("exact match:", 1),
    ("seconds per call:", 1),
    ("minilora / bitsandbytes (same run):", 1),
]


def numbers_after(report, label):
    """For each line containing label, the numbers that follow it."""
    return [[float(n) for n in re.findall(NUMBER, line.split(label, 1)[1])] for line in report.splitlines()
            if label in line]


def test_the_reduced_gpu_check_runs_every_part_on_the_cpu(repo, tmp_path):
    output = tmp_path / "report.txt"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--reduced", "--output", str(output)], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = output.read_text()
    for heading in ("date:", "device:", "versions: torch", "== 1. minilora", "== 2. reference",
                    "== 3. the default tiny tune", "== 4. dequantizing",
                    "compiled values bit-identical to eager: yes", "memory plan:", "minilora / reference",
                    "verdict: every part ran"):
        assert heading in report, f"no {heading!r} in the report:\n{report}"
    for label, lines in LABELS:
        found = numbers_after(report, label)
        assert len(found) == lines and all(found), f"{label!r}: {found}\n{report}"
        assert all(math.isfinite(n) for numbers in found for n in numbers), f"{label!r}: {found}\n{report}"
    (ratio,) = numbers_after(report, "step-1 loss (the same weights and batch: near 1):")[0][-1:]
    assert abs(ratio - 1) < 0.02, f"the two stacks' first losses differ: ratio {ratio}\n{report}"
