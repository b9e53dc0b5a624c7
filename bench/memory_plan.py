"""The memory plan against the memory a QLoRA + AdaLoRA run really uses on this CPU, and the streaming load's peak.

Training: for each Llama-shaped model (built from a config, random weights) a fresh Python process imports
everything and runs the same code once on a tiny model (so that code pages, thread pools and the cached NF4
lookup tables are paid for), notes its resident set size (RSS) and resets the kernel's peak-RSS record. Then it
loads the model through load_quantized (NF4 + double quantization), puts AdaLoRA on the seven projections and
runs a few training steps the way minilora.tune.train does (gradient checkpointing, PagedAdamW, float32). The
measured peak is what the process added to its RSS at its worst moment:

    measured = VmHWM (peak RSS since the reset) - VmRSS at the reset,

compared with plan_memory(config, settings).peak for the same settings. (ru_maxrss would also do within one
process, but it keeps the parent's RSS across fork + exec and the import-time peak; the reset avoids both.)

Streaming load: a float32 checkpoint in shards, loaded by a fresh process; its peak should be the quantized
model plus about one full-precision tensor, far below the checkpoint's size.

glibc's malloc: by default its mmap threshold grows with the tensors freed (up to 32 MiB) and freed mid-sized
tensors stay in its heap, so the RSS also holds the heap's history. The measurements fix the threshold at 64 KiB
(MALLOC_MMAP_THRESHOLD_): each allocation of 64 KiB or more gets its own mapping, returned to the system when it
is freed, and the RSS follows what the program holds. The table shows glibc's default next to it.
Run: .venv/bin/python bench/memory_plan.py   (a few minutes)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {  # name: LlamaConfig arguments
    "llama-58m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-217m": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
    # a small vocabulary: the layers' activations, not the logits, make the transient peak
    "llama-26m-v1k": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=1024),
    # linear layers make almost all of it: the checkpoint of the streaming-load measurement
    "llama-51m-v1k": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=1024),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
RUNS = [  # (model, batch size, sequence length)
    ("llama-58m", 1, 64),
    ("llama-58m", 4, 256),
    ("llama-217m", 1, 64),
    ("llama-217m", 2, 256),
    ("llama-26m-v1k", 4, 512),
]
STEPS = 3
PAGE_BYTES = 64 * 1024
INIT_R, TARGET_R = 12, 8
TOLERANCE = 0.15
MMAP_THRESHOLD = 64 * 1024
REPO = Path(__file__).resolve().parent.parent


def status_bytes(field):
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this measurement needs Linux")


def reset_peak():
    """Restart the kernel's record of peak RSS (VmHWM) from the current RSS; return that RSS (Linux >= 4.0)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def quiet():
    import warnings

    from transformers.utils import logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def train_briefly(config, batch_size, seq_len, steps, resident_bytes=None, report=None, embeddings_dtype=None):
    """load_quantized, add_adalora, then `steps` optimizer steps as minilora.tune.train takes them: forward with
    gradient checkpointing, loss + γ·orthogonal penalty, backward, clipping, PagedAdamW, the rank allocator.
    (Written out here, not imported from minilora.tune, whose imports cost seconds that every measuring process
    would pay.) report(stage), if given, is called after loading, after adding the adapters and after each step.
    embeddings_dtype: store the embeddings and head in it (qlora.store_embeddings_in); None keeps float32."""
    import torch

    from minilora.adalora import AdaLoRAConfig, add_adalora
    from minilora.memory import LLAMA_PROJECTIONS
    from minilora.orthogonal import orthogonal_penalty
    from minilora.paged_optim import PagedAdamW
    from minilora.qlora import load_quantized, store_embeddings_in

    report = report or (lambda stage: None)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    model = load_quantized(config, LLAMA_PROJECTIONS)
    if embeddings_dtype is not None:
        store_embeddings_in(model, embeddings_dtype)
    report("loaded")
    adalora = AdaLoRAConfig(target_modules=list(LLAMA_PROJECTIONS), init_r=INIT_R, target_r=TARGET_R,
                            total_steps=steps, t_init=0, t_final=0)
    model, allocator = add_adalora(model, adalora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=1e-4, weight_decay=0.0, page_bytes=PAGE_BYTES, resident_bytes=resident_bytes)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    report("adapters")
    for step in range(1, steps + 1):
        model(input_ids=tokens, labels=tokens).loss.backward()
        (adalora.orth_reg_weight * orthogonal_penalty(model)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad(set_to_none=True)
        report(step)


def measure_training(model_name, batch_size, seq_len, steps=STEPS):
    """(Run in a fresh process.) The RSS that loading and `steps` training steps added at their worst moment."""
    import time

    from transformers import LlamaConfig

    quiet()
    train_briefly(LlamaConfig(**TINY), 1, 8, 2)  # warm-up: what any run pays once
    baseline = reset_peak()
    start = time.perf_counter()
    train_briefly(LlamaConfig(**MODELS[model_name]), batch_size, seq_len, steps)
    return {"peak": status_bytes("VmHWM") - baseline, "seconds": time.perf_counter() - start}


def measure_loading(directory):
    """(Run in a fresh process.) The RSS that load_quantized(directory) added at its worst moment."""
    from transformers import LlamaConfig

    from minilora.qlora import load_quantized, module_bytes

    quiet()
    load_quantized(LlamaConfig(**TINY))  # warm-up: the model's code and the NF4 lookup tables
    baseline = reset_peak()
    model = load_quantized(directory)
    return {"peak": status_bytes("VmHWM") - baseline, "model": module_bytes(model)}


def start(function, *args, malloc_cache=False, threads=1):
    """Start `function(*args)` of this file in a fresh interpreter; finish(process) waits for its result.

    malloc_cache=False fixes glibc's mmap threshold at MMAP_THRESHOLD (see the module docstring). One thread per
    process: this is a memory measurement, and several run side by side on a small machine."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import memory_plan; "
            f"print(json.dumps(memory_plan.{function}(*{args!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not malloc_cache:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def finish(process):
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def planned(model, batch_size, seq_len, resident_bytes=None, device="cpu", dtype_bytes=4, base_bytes=None):
    """plan_memory for the settings train_briefly uses (float32 on the CPU by default; a GPU run passes its device
    type and the compute dtype's bytes; base_bytes: the embeddings' and head's, by default the compute dtype's);
    model is a name of MODELS or a config."""
    from transformers import LlamaConfig

    from minilora.memory import RunSettings, plan_memory

    settings = RunSettings(batch_size=batch_size, seq_len=seq_len, init_r=INIT_R, double_quant=True,
                           compute_bytes=dtype_bytes, base_bytes=base_bytes or dtype_bytes, gradient_checkpointing=True,
                           page_bytes=PAGE_BYTES, device=device, optimizer_resident_bytes=resident_bytes)
    return plan_memory(LlamaConfig(**MODELS[model]) if isinstance(model, str) else model, settings)


def write_checkpoint(model_name, directory, max_shard_size="50MB"):
    """Save a randomly initialized float32 model in safetensors shards; return (its bytes, its largest tensor)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[model_name]))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def main():
    mib = 2**20
    print("Training: peak RSS added by load_quantized + add_adalora + a few steps, vs plan_memory's peak")
    print(f"{'model':<15}{'batch':>6}{'seq':>6}{'planned MiB':>13}{'measured MiB':>14}{'measured/planned':>18}"
          f"{'glibc default MiB':>19}{'s/step':>8}")
    for model_name, batch_size, seq_len in RUNS:
        plan = planned(model_name, batch_size, seq_len)
        fixed = finish(start("measure_training", model_name, batch_size, seq_len))
        default = finish(start("measure_training", model_name, batch_size, seq_len, malloc_cache=True))
        print(f"{model_name:<15}{batch_size:>6}{seq_len:>6}{plan.peak / mib:>13.1f}{fixed['peak'] / mib:>14.1f}"
              f"{fixed['peak'] / plan.peak:>18.3f}{default['peak'] / mib:>19.1f}{fixed['seconds'] / STEPS:>8.2f}",
              flush=True)
    print(f"measured with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; the plan is meant to be within ±{TOLERANCE:.0%}")
    print()
    with tempfile.TemporaryDirectory() as directory:
        full, largest = write_checkpoint("llama-51m-v1k", directory)
        loaded = finish(start("measure_loading", directory))
    print("Streaming load of a float32 safetensors checkpoint (50 MB shards)")
    print(f"checkpoint {full / mib:.1f} MiB | quantized model {loaded['model'] / mib:.1f} MiB | largest tensor "
          f"{largest / mib:.1f} MiB | measured peak {loaded['peak'] / mib:.1f} MiB = "
          f"{loaded['peak'] / (loaded['model'] + largest):.2f} x (quantized model + largest tensor)")


if __name__ == "__main__":
    main()
