"""minilora.nf4 vs bitsandbytes on the CPU: quantize and dequantize of Llama-sized weights, NF4 with block size 64.

bitsandbytes' CPU quantize_4bit is plain PyTorch built on torch.bucketize; its dequantize_4bit is a native C++ loop
(AVX-512 where the CPU has it). For each case the two libraries run alternately, several times, in one process;
the table reports the best time of each and the ratio bitsandbytes / minilora (> 1: minilora is faster). The
process CPU time is reported too: on a machine shared with other work it moves less than the wall-clock time.
Before timing, every case checks that both produce the same bytes and values.
Run: .venv/bin/python bench/nf4_speed.py [--repeats N]
"""

import argparse
import logging
import time

import bitsandbytes.functional as bnbF
import torch

from minilora.nf4 import dequantize_nf4, quantize_nf4

SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = [torch.float32, torch.bfloat16]


def timed(fn):
    """(wall seconds, process CPU seconds) of one call."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def alternate(ours, theirs, repeats):
    """Best (wall, CPU) of ours and of theirs, timed alternately so that both see the same machine load."""
    ours(), theirs()  # warm up: tables, allocator
    rounds = [(timed(ours), timed(theirs)) for _ in range(repeats)]
    ours_wall = min(o[0] for o, _ in rounds)
    ours_cpu = min(o[1] for o, _ in rounds)
    theirs_wall = min(t[0] for _, t in rounds)
    theirs_cpu = min(t[1] for _, t in rounds)
    return ours_wall, ours_cpu, theirs_wall, theirs_cpu


def row(operation, shape, dtype, timings):
    ours_wall, ours_cpu, theirs_wall, theirs_cpu = timings
    ratio = theirs_wall / ours_wall
    verdict = f"minilora {ratio:.1f}x faster" if ratio >= 1 else f"bitsandbytes {1 / ratio:.1f}x faster"
    name = str(dtype).removeprefix("torch.")
    return (f"{operation:<10} {shape[0]}x{shape[1]:<6} {name:<9} {ours_wall * 1e3:>9.1f} {theirs_wall * 1e3:>9.1f} "
            f"{ratio:>7.2f} {theirs_cpu / ours_cpu:>8.2f}  {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (the best one counts)")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; NF4, block size 64; best of {args.repeats}\n")
    header = (f"{'operation':<10} {'shape':<11} {'dtype':<9} {'mini ms':>9} {'bnb ms':>9} {'bnb/mini':>7} "
              f"{'cpu ratio':>8}  verdict")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype in DTYPES:
            w = torch.randn(shape, generator=generator).to(dtype)
            q = quantize_nf4(w)
            packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
            assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
            assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state))
            print(row("quantize", shape, dtype, alternate(lambda w=w: quantize_nf4(w),
                                                          lambda w=w: bnbF.quantize_4bit(w, quant_type="nf4"),
                                                          args.repeats)), flush=True)
            print(row("dequantize", shape, dtype, alternate(lambda q=q: dequantize_nf4(q),
                                                            lambda p=packed, s=state: bnbF.dequantize_4bit(p, s),
                                                            args.repeats)), flush=True)
            del w, q, packed, state
    print("\nbnb/mini = bitsandbytes wall time / minilora wall time (best of each); cpu ratio = the same for process")
    print("CPU time. Goals: quantize at least 2x faster than bitsandbytes, dequantize within 1.5x (bnb/mini >= 0.67).")


if __name__ == "__main__":
    main()
