"""minilora.nf4 against bitsandbytes and torchao on the CPU, in the configurations QLoRA training uses: NF4 with
block size 64, double quantization off and on, dequantized into float32 and into bfloat16, on the two Llama-2-7B
projection shapes (4096x4096 and 4096x11008).

bitsandbytes' CPU quantize_4bit is plain PyTorch built on torch.bucketize; its dequantize_4bit is a native C++
loop (AVX-512 where the CPU has it). torchao's NF4Tensor (the other pure-PyTorch implementation) always
double-quantizes, its constants in int8 blocks of 256 rather than the dynamic map, so it is timed only with double
quantization on, and its bits differ. For each case the libraries run alternately, several times, in one process;
the table reports the best wall time of each and the ratios other / minilora (> 1: minilora is faster). Before
timing, every case checks that minilora and bitsandbytes produce the same codes and, without double quantization,
the same values; with it, bitsandbytes' CPU 8-bit quantizer picks another code for a fraction of the block
constants (notebook 06), so a small fraction of the dequantized values differ (< 1% is checked).
minilora's dequantize_nf4 asks Linux to back its new output with 2 MiB pages (minilora.nf4.empty_on_huge_pages);
bitsandbytes' output is a plain torch.empty, whose every 4 KiB page costs a page fault when first written. The
"mini out" column times minilora's arithmetic alone, into an output that already exists. To give every large
allocation huge pages, bitsandbytes' output included, run with PyTorch's own switch THP_MEM_ALLOC_ENABLE=1.
Dequantizing "into bfloat16" means a weight quantized from bfloat16, whose dequantized values come back in bfloat16
(the compute dtype of a GPU run); "into float32" the same from float32 (the CPU's).
Run: .venv/bin/python bench/nf4_speed.py [--repeats N]
torchao is not a dependency: once installed, transformers imports it with every model, and its import prints
warnings into the notebooks' outputs (strict nbval then fails). Time it from a separate environment:
    python3 -m venv /tmp/ao && /tmp/ao/bin/pip install torch==2.13.0 torchao==0.18.0 -e ".[dev]"
    /tmp/ao/bin/python bench/nf4_speed.py
"""

import argparse
import logging
import time

import bitsandbytes.functional as bnbF
import torch
from seven_b_cpu import machine

from minilora.nf4 import dequantize_nf4, dequantize_nf4_slab, empty_on_huge_pages, quantize_nf4

SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = [torch.float32, torch.bfloat16]


def torchao_nf4():
    """torchao's to_nf4(tensor, block_size, scaler_block_size), or None when torchao is not installed."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        return None
    return to_nf4


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_times(functions, repeats):
    """The best wall time of each function, timed in turn round after round so that all see the same load."""
    for fn in functions:
        fn()  # warm up: tables, allocator
    rounds = [[timed(fn) for fn in functions] for _ in range(repeats)]
    return [min(times) for times in zip(*rounds, strict=True)]


def row(operation, shape, dtype, double_quant, times):
    ours, theirs, torchao, reused = times
    name = str(dtype).removeprefix("torch.")
    ao = f"{torchao * 1e3:>9.1f} {torchao / ours:>8.2f}" if torchao is not None else f"{'-':>9} {'-':>8}"
    own = f"{reused * 1e3:>9.1f}" if reused is not None else f"{'-':>9}"
    return (f"{operation:<10} {shape[0]}x{shape[1]:<6} {'on' if double_quant else 'off':<3} {name:<9} "
            f"{ours * 1e3:>9.1f} {theirs * 1e3:>9.1f} {theirs / ours:>8.2f} {ao} {own}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (the best one counts)")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    to_nf4 = torchao_nf4()
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NF4, block size 64; best of {args.repeats}")
    print("torchao: " + ("installed" if to_nf4 else "not installed (see this script's docstring): its columns are -"))
    header = (f"\n{'operation':<10} {'shape':<11} {'DQ':<3} {'dtype':<9} {'mini ms':>9} {'bnb ms':>9} {'bnb/mini':>8} "
              f"{'ao ms':>9} {'ao/mini':>8} {'mini out':>9}")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for double_quant in (False, True):
            for dtype in DTYPES:
                w = torch.randn(shape, generator=generator).to(dtype)
                q = quantize_nf4(w, double_quant=double_quant)
                packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
                assert torch.equal(q.packed, packed.view(-1))
                differ = (dequantize_nf4(q) != bnbF.dequantize_4bit(packed, state)).float().mean().item()
                assert differ == 0 or double_quant and differ < 0.01, differ  # see the docstring
                ao = to_nf4(w, 64, 256) if to_nf4 and double_quant else None
                quantizers = [lambda w=w, dq=double_quant: quantize_nf4(w, double_quant=dq),
                              lambda w=w, dq=double_quant: bnbF.quantize_4bit(w, quant_type="nf4",
                                                                              compress_statistics=dq)]
                dequantizers = [lambda q=q: dequantize_nf4(q), lambda p=packed, s=state: bnbF.dequantize_4bit(p, s)]
                out = empty_on_huge_pages(w.numel(), dtype, w.device).view(shape)  # on the same pages as minilora's
                whole = slice(0, shape[0]), slice(0, shape[1])
                into_out = [lambda q=q, out=out, whole=whole: dequantize_nf4_slab(q, q.absmax, *whole, out)]
                if ao is not None:
                    quantizers.append(lambda w=w: to_nf4(w, 64, 256))
                    dequantizers.append(lambda ao=ao: ao.get_original_weight())
                for operation, functions, own in (("quantize", quantizers, []), ("dequantize", dequantizers, into_out)):
                    times = best_times(functions + own, args.repeats)
                    reused = times.pop() if own else None
                    times = [*times, *[None] * (3 - len(times)), reused]
                    print(row(operation, shape, dtype, double_quant, times), flush=True)
                del w, q, packed, state, ao, out
    print("\nbnb/mini, ao/mini = bitsandbytes' and torchao's best wall time / minilora's (> 1: minilora is faster).")
    print("mini out = minilora dequantizing into an output it already has (dequantize_nf4_slab over the whole weight,")
    print("on huge pages like dequantize_nf4's): its arithmetic alone, without the page faults of a new output.")
    print("bitsandbytes has no CPU dequantize into a given output, so its arithmetic cannot be timed alone that way.")
    print("Goals (issue 16): quantize at least 2x faster than bitsandbytes; dequantize with double quantization, into")
    print("float32 and bfloat16, at most bitsandbytes' time (bnb/mini >= 1).")


if __name__ == "__main__":
    main()
