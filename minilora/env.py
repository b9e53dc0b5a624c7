"""`python -m minilora env`: what this machine has, checked against what minilora needs.

A learner pastes the output into a bug report. Every line ends in a verdict: ok, note, or FIX (with what to do).
"""

import os
import platform
import sys
import time
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

KEY_PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "datasets", "scipy", "matplotlib", "safetensors"]


def tested_ranges():
    """The version range of each key package, read from minilora's own installed requirements."""
    ranges = {}
    for line in metadata.requires("minilora") or []:
        req = Requirement(line)
        if req.marker is None and req.name in KEY_PACKAGES:
            ranges[req.name] = req.specifier
    return ranges


def package_rows():
    rows = []
    for name, spec in tested_ranges().items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            rows.append((name, "missing", f"FIX: not installed; run `make setup` (needs {spec})"))
            continue
        release = Version(version).public  # 2.13.0+cpu -> 2.13.0
        if spec.contains(release, prereleases=True):
            rows.append((name, version, f"ok (tested: {spec})"))
        else:
            rows.append((name, version, f"FIX: outside the tested range {spec}; run `make setup`"))
    return rows


def matmul_seconds(dtype, n=512, repeats=3):
    """Best-of-three time of one n×n matmul on the CPU in the given dtype."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def report():
    """Return the report as a list of (item, value, verdict) rows."""
    import torch

    python_ok = sys.version_info >= (3, 10)
    rows = [
        ("python", platform.python_version(), "ok" if python_ok else "FIX: minilora needs Python 3.10 or newer"),
        ("platform", f"{platform.system()} {platform.machine()}", "ok"),
    ]
    rows += package_rows()
    rows.append(("cpu threads", f"torch uses {torch.get_num_threads()} of {os.cpu_count()} cores", "ok"))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        rows.append(("cuda", f"{torch.version.cuda}, {name}", "ok: GPU paths available"))
        rows.append(("bf16 on gpu", str(bf16), "ok: compute in bfloat16" if bf16 else "note: compute in float16"))
    else:
        rows.append(("cuda", "not available", "note: everything runs on the CPU; no GPU is needed for the course"))
    slowdown = matmul_seconds(torch.bfloat16) / matmul_seconds(torch.float32)
    verdict = (
        "ok: bfloat16 compute is usable on this CPU"
        if slowdown < 2
        else "note: keep float32 compute on this CPU (minilora's CPU default)"
    )
    rows.append(("bf16 matmul on cpu", f"{slowdown:.1f}x the float32 time", verdict))
    return rows


def main():
    rows = report()
    width = max(len(item) for item, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    print("minilora environment report")
    for item, value, verdict in rows:
        print(f"  {item:<{width}}  {value:<{value_width}}  {verdict}")
    problems = sum(verdict.startswith("FIX") for _, _, verdict in rows)
    print("verdict:", "ready" if not problems else f"{problems} thing(s) to fix, see FIX above")
    return 1 if problems else 0
