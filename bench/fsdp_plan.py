"""On paper: a 70B QLoRA + AdaLoRA run on 1, 2 and 8 GPUs, data parallel (what minilora runs) against sharded (FSDP,
what it would need). Arithmetic on minilora.memory.plan_memory's rows, nothing measured; no GPU needed.

Data parallel (torchrun + DistributedDataParallel, minilora.distributed): every GPU holds the whole 4-bit model,
the adapters and their states, so each needs the one-GPU plan whatever the number of GPUs. Sharded: each GPU keeps
1/N of everything that persists (the NF4 codes and constants, the unquantized embeddings, head and norms, the
adapters, their gradients, importance scores and resident optimizer states); the transient moments of a step
(activations, logits, a dequantized weight, the gradients through a layer) stay whole, since each GPU still runs
its own batch through every layer; and one decoder layer's codes and constants are gathered whole on every GPU
before it runs, two with the next layer's gathered ahead (prefetch), as FSDP does.

Run: .venv/bin/python bench/fsdp_plan.py   (writes bench/results/fsdp_plan.txt)
"""

from dataclasses import replace
from pathlib import Path

from minilora.architectures import resolve_config
from minilora.memory import linear_shapes, nf4_bytes, plan_memory
from minilora.tune import recipe

GIB = 2**30
PERSISTENT = ("quantized weights (NF4 codes)", "quantization constants", "embeddings, head and norms", "adapters",
              "gradients", "importance scores", "optimizer states (resident)")
RESULTS = Path(__file__).resolve().parent / "results" / "fsdp_plan.txt"


def layer_bytes(config, blocksize=64):
    """One decoder layer's seven NF4 projections, codes and double-quantized constants."""
    return sum(sum(nf4_bytes(out_f * in_f, blocksize, True)) for _, out_f, in_f in linear_shapes(config))


def main():
    model = "llama-2-70b"
    config = resolve_config(model)
    # QLoRA's settings with AdaLoRA's budget, at 70B's shapes, bfloat16 on GPUs
    settings = replace(recipe("qlora-7b"), model=model, device="cuda", compute_dtype="bfloat16")
    plan = plan_memory(config, settings.memory_settings())
    persistent = sum(plan.bytes_of(name) for name in PERSISTENT)
    transient = plan.peak - persistent
    gathered = 2 * layer_bytes(config)
    lines = [f"{model} (80 layers, hidden 8192, MLP 28672, 8 key/value heads), recipe qlora-7b: AdaLoRA rank "
             f"{settings.init_r} on all seven projections, batch 1 x {settings.max_length} tokens per GPU, bfloat16, "
             "gradient checkpointing, 64 MiB of optimizer states resident",
             f"one-GPU plan: peak {plan.peak / GIB:.1f} GiB = persistent {persistent / GIB:.1f} + transient "
             f"{transient / GIB:.1f}; PagedAdamW's page pool, {plan.bytes_of('optimizer page pool') / GIB:.1f} GiB, "
             "in host memory (per process)",
             f"a gathered decoder layer (codes + constants): {gathered / 2 / GIB:.2f} GiB, two with prefetch", "",
             f"{'GPUs':>4}  {'data parallel, per GPU':>22}  {'sharded (FSDP), per GPU':>24}"]
    for gpus in (1, 2, 8):
        sharded = persistent / gpus + transient + (gathered if gpus > 1 else 0)
        lines.append(f"{gpus:>4}  {plan.peak / GIB:>18.1f} GiB  {sharded / GIB:>20.1f} GiB")
    print("\n".join(lines))
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
