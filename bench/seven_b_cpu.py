"""QLoRA + AdaLoRA on the Llama-2-7B architecture, on this CPU: peak resident memory, seconds per step, and the
memory plan's prediction for the same settings.

The model has random weights (load_quantized("llama-2-7b"): built on the meta device, each of the 224 projection
matrices drawn, quantized to NF4 with double quantization and dropped, one at a time); embeddings and head are
stored in bfloat16 and computed in float32 (--no-bf16-embeddings: stored in float32), norms stay in float32.
AdaLoRA (init_r 12, target_r 8) goes on all seven projections of every layer; the steps
use batch 1, short sequences, gradient checkpointing, float32 compute and PagedAdamW with 64 KiB pages and a
small resident budget (on a CPU the page pool and the resident pages are both RAM: without a budget the states
would be held twice).

glibc's malloc: by default it keeps freed blocks below its (self-raising) mmap threshold in its heap, and the
interleaving of long-lived tensors (importance scores) with short-lived ones (gradients, temporaries) makes that
heap grow from step to step. By default this script fixes the threshold at 64 KiB first (mallopt, what the
environment variable MALLOC_MMAP_THRESHOLD_=65536 does), so that freed tensors go back to the system;
--mmap-threshold-kib 0 leaves glibc's default. The report says which was used.

Run: .venv/bin/python bench/seven_b_cpu.py [--seq-len 32] [--steps 3] [--threads N]   (10-20 minutes, ~6 GiB)
Writes its report to bench/results/seven_b_cpu.txt (or --output) as well.
"""

import argparse
import os
import platform
import time
from pathlib import Path

from memory_plan import INIT_R, PAGE_BYTES, TARGET_R, planned, quiet, status_bytes, train_briefly

RESULTS = Path(__file__).resolve().parent / "results" / "seven_b_cpu.txt"
GIB = 2**30


def machine():
    """The CPU model, its logical cores and the RAM, from /proc, and the kernels torch picked for it (AVX512, AVX2,
    DEFAULT...): float results depend on them, and bitsandbytes 0.50's CPU dequantize bug shows on AVX-512 only."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    ram = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return (f"{cpu}, {os.cpu_count()} logical cores, {ram / GIB:.1f} GiB RAM, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def fix_mmap_threshold(kib):
    """Have glibc's malloc map every block of `kib` KiB or more on its own, and unmap it when it is freed."""
    import ctypes
    import ctypes.util

    if ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, kib * 1024) != 1:  # -3: M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: this needs glibc; pass --mmap-threshold-kib 0")


class Breakdown:
    """Seconds spent dequantizing (dequantize_nf4, or dequantize_nf4_slab when the products go a slab at a time)
    and in the rest of NF4Linear's products (the base matmuls, forward and backward), accumulated over a step by
    wrapping the functions that do them."""

    def __init__(self):
        from minilora import qlora

        self.dequantize = self.layer = 0.0
        layer = qlora.DequantizeMatmul
        dequantize, slab = qlora.dequantize_nf4, qlora.dequantize_nf4_slab
        forward, backward = layer.forward, layer.backward

        def timed(function, field):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - start)
            return wrapper

        qlora.dequantize_nf4 = timed(dequantize, "dequantize")
        qlora.dequantize_nf4_slab = timed(slab, "dequantize")
        layer.forward = staticmethod(timed(forward, "layer"))
        layer.backward = staticmethod(timed(backward, "layer"))

    def take(self, seconds):
        """The split of a step that took `seconds`: (dequantize, matmul, rest); the counters start again."""
        parts = (self.dequantize, self.layer - self.dequantize, seconds - self.layer)
        self.dequantize = self.layer = 0.0
        return parts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="a known architecture or a directory with a config.json")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--resident-mib", type=int, default=16, help="PagedAdamW resident budget, MiB")
    parser.add_argument("--mmap-threshold-kib", type=int, default=64, help="glibc mmap threshold; 0: glibc default")
    parser.add_argument("--bf16-embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="store embeddings and head in bfloat16 (computed in float32): qlora.store_embeddings_in")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.mmap_threshold_kib:
        fix_mmap_threshold(args.mmap_threshold_kib)

    import torch

    from minilora.architectures import resolve_config

    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = resolve_config(args.model)
    resident = args.resident_mib * 2**20
    plan = planned(config, 1, args.seq_len, resident, base_bytes=2 if args.bf16_embeddings else 4)
    baseline = status_bytes("VmRSS")  # the interpreter, torch, transformers and minilora, imported
    lines = [f"machine: {machine()}",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}",
             f"{args.model} architecture, random weights; NF4 + double quantization on the 224 projections; AdaLoRA "
             f"init_r {INIT_R} target_r {TARGET_R} on all of them; batch 1 x {args.seq_len} tokens; gradient "
             f"checkpointing; float32 compute; embeddings and head stored in "
             f"{'bfloat16' if args.bf16_embeddings else 'float32'}; PagedAdamW page {PAGE_BYTES // 1024} KiB, "
             f"resident budget {args.resident_mib} MiB; {args.steps} optimizer steps",
             "malloc: " + (f"glibc, mmap threshold fixed at {args.mmap_threshold_kib} KiB" if args.mmap_threshold_kib
                           else "glibc defaults"),
             f"RSS after imports: {baseline / GIB:.2f} GiB"]
    for line in lines:
        print(line, flush=True)
    stamps = {"start": time.perf_counter()}
    breakdown, parts = Breakdown(), {}

    def report(stage):
        stamps[stage] = time.perf_counter()
        line = (f"{'after ' + str(stage) if isinstance(stage, str) else f'after step {stage}':<18} "
                f"RSS {status_bytes('VmRSS') / GIB:6.2f} GiB, peak so far {status_bytes('VmHWM') / GIB:6.2f} GiB, "
                f"{stamps[stage] - stamps['start']:7.1f} s since start")
        if isinstance(stage, int):
            parts[stage] = breakdown.take(stamps[stage] - stamps[stage - 1 if stage > 1 else "adapters"])
            line += ": dequantize {:.1f} s, matmul {:.1f} s, rest {:.1f} s".format(*parts[stage])
        else:
            breakdown.take(0.0)
        lines.append(line)
        print(line, flush=True)

    train_briefly(config, 1, args.seq_len, args.steps, resident_bytes=resident, report=report,
                  embeddings_dtype=torch.bfloat16 if args.bf16_embeddings else None)
    peak = status_bytes("VmHWM")
    later = range(2, args.steps + 1) if args.steps > 1 else [1]  # step 1 also pays first-use costs
    seconds = [sum(parts[step][i] for step in later) / len(later) for i in range(3)]
    summary = [
        f"peak resident memory: {peak / GIB:.2f} GiB (goal: at most 5.0 GiB)",
        f"  of which the imports: {baseline / GIB:.2f} GiB; added by the run: {(peak - baseline) / GIB:.2f} GiB",
        f"memory plan's predicted peak for the same settings: {plan.peak / GIB:.2f} GiB added "
        f"(+ imports = {(plan.peak + baseline) / GIB:.2f} GiB); measured / planned = "
        f"{(peak - baseline) / plan.peak:.3f}",
        f"loading (random weights, 224 matrices quantized): {stamps['loaded'] - stamps['start']:.0f} s",
        f"seconds per training step: {sum(seconds):.1f} (mean of steps {later[0]}..{later[-1]}; step 1: "
        f"{stamps[1] - stamps['adapters']:.1f} s)",
        f"  dequantize (NF4 to the compute dtype) {seconds[0]:.1f} s, matmul (the rest of NF4Linear's forward and "
        f"backward) {seconds[1]:.1f} s, the rest {seconds[2]:.1f} s",
        "",
        "memory plan:",
        str(plan),
    ]
    print("\n".join(summary))
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text("\n".join([*lines, "", *summary]) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
