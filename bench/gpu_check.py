"""The GPU check (issue 11): minilora against transformers + bitsandbytes + peft on one CUDA GPU, in one command.

QLoRA + AdaLoRA on the Llama-2-7B architecture with each stack, side by side, then the default tiny tune on the GPU;
one report.

1. minilora: load_quantized("llama-2-7b", device="cuda") (random weights; NF4 + double quantization on the 224
   projections, each quantized on the GPU as it arrives; bfloat16 compute, float16 where the GPU lacks bfloat16),
   AdaLoRA init_r 12 -> target_r 8 on all seven projections, then minilora.tune.train (PagedAdamW, every page
   resident) for 20 optimizer steps at batch 1 x 512 random tokens with gradient checkpointing. Reported: the
   peak memory of the load and of the training (torch.cuda.max_memory_allocated, its record reset before each),
   seconds per step (median of steps 3 .. 20, the GPU synchronized at every step boundary) and plan_memory's
   predicted peak for the same settings, with measured / predicted.
2. reference: the same model from the same stream of random tensors (minilora.qlora.random_tensors, seed 0),
   through transformers + bitsandbytes + peft: transformers' replace_with_bnb_linear with a BitsAndBytesConfig
   (NF4, double quantization, the same compute dtype) on the meta-device model, each projection weight quantized
   on the GPU as it arrives, as from_pretrained quantizes a checkpoint (Params4bit(...).to(device)); peft's
   AdaLoRA with the same ranks, targets and schedule (it adds the orthogonal penalty inside the forward); the same
   batches, steps, learning rate, clipping and gradient checkpointing. The optimizer is torch.optim.AdamW:
   bitsandbytes' paged AdamW keeps its states in CUDA managed memory, which max_memory_allocated does not count,
   while torch's AdamW keeps them where minilora's PagedAdamW keeps its resident pages, in the memory measured.
   Reported as for minilora, and minilora / reference ratios (never absolute thresholds, as every bench here).
3. The default tiny tune on the GPU: minilora.tune.run(RunConfig(device="cuda", train=TrainSettings(steps=300)))
   into a temporary directory: held-out loss and exact match before and after, and its wall time.
4. Dequantizing one MLP projection (11008 x 4096, NF4 + double quantization) to the compute dtype: minilora's
   vectorized dequantize_nf4, the same through torch.compile (compiled="inductor": one fused kernel), and
   bitsandbytes' dequantize_4bit; the median of 20 calls each after 3 warm-up calls, as ratios to bitsandbytes,
   and whether the compiled values are bit-identical to the eager ones.

Each part runs after the previous one's model is freed; a part that fails is reported as FAILED (its traceback on
stderr), the others still run, and the script exits with status 1.

--reduced rehearses all of it on the CPU in under a minute, so that the script cannot rot without a GPU
(tests/test_gpu_check.py runs it): bench/memory_plan.py's TINY Llama instead of 7B, 3 steps at batch 1 x 32
tokens, float32 compute, bitsandbytes' CPU Linear4bit, the tiny tune with 2 steps and 4 evaluation examples,
and part 4 on the tiny model's MLP matrix compiled with the aot_eager backend (it traces the same graph as inductor
but generates no code, so it needs no C compiler).
Memory there is the peak resident set added (VmHWM, reset as bench/memory_plan.py does, glibc's mmap threshold
fixed at 64 KiB as in bench/seven_b_cpu.py), not a CUDA counter; the times mean nothing.

Run: .venv/bin/python bench/gpu_check.py --device cuda   (one CUDA GPU of the A100 / H100 / H200 class; sized for
                                                          8 minutes, not yet timed on one)
     .venv/bin/python bench/gpu_check.py --reduced        (the CPU rehearsal, under a minute)
Without a GPU and without --device, it says so and skips (`make bench` runs every script here). Writes the report
to bench/results/gpu_check_<device>.txt (gpu_check_<device>_reduced.txt with --reduced) or --output.
"""

import argparse
import datetime
import gc
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch
from memory_plan import INIT_R, PAGE_BYTES, TARGET_R, TINY, planned, quiet, reset_peak, status_bytes
from qlora_stack import Timed
from seven_b_cpu import fix_mmap_threshold, machine

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
LR = 2e-4  # QLoRA's learning rate for 7B; the weights are random, so it only has to keep the steps finite
FULL = dict(model="llama-2-7b", seq_len=512, steps=20, tune_steps=300, tune_eval_examples=200)
REDUCED = dict(model="memory_plan.TINY", seq_len=32, steps=3, tune_steps=2, tune_eval_examples=4)
DEQUANTIZE_CALLS = 20


# ---- the device: what it is, its memory record, its clock ----

def describe_device(device):
    if device.type != "cuda":
        return f"CPU (no CUDA counters: memory is peak RSS): {machine()}"
    props = torch.cuda.get_device_properties(device)
    return (f"{torch.cuda.get_device_name(device)}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")


def versions():
    names = ["torch", "transformers", "bitsandbytes", "peft"]
    return ", ".join(f"{name} {metadata.version(name)}" for name in names) + f", python {platform.python_version()}"


def compute_dtype(device):
    """bfloat16 on a GPU that has it (QLoRA's choice), float16 on one that does not, float32 on a CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def reset_peak_memory(device):
    """Free what is unreferenced, restart the peak-memory record and return the memory in use now (bytes): CUDA's
    allocated bytes on a GPU, the resident set on a CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return reset_peak()


def peak_memory(device):
    """The most memory in use since reset_peak_memory (bytes), measured as it measures."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")


def synchronize(device):
    """Wait for the GPU's queued work, so that a clock read after it counts that work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncedTimes(Timed):
    """qlora_stack.Timed, with the GPU's work finished before each draw is timed: each gap is a whole step."""

    def __init__(self, batches, device):
        super().__init__(batches)
        self.device = device

    def __next__(self):
        synchronize(self.device)
        return super().__next__()


def random_batches(vocab_size, seq_len, seed=0):
    """Batches of one random sequence, the labels the tokens themselves, the same sequence of them every run."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab_size, (1, seq_len), generator=generator)
        yield {"input_ids": tokens, "labels": tokens}


# ---- the settings both stacks share ----

def train_settings(steps):
    from minilora.tune import TrainSettings

    return TrainSettings(steps=steps, batch_size=1, lr=LR, gradient_checkpointing=True, page_bytes=PAGE_BYTES)


def adalora_config(steps):
    """minilora's AdaLoRA settings (its defaults resolve the schedule: t_init 10%, t_final 30% of the steps)."""
    from minilora.adalora import AdaLoRAConfig
    from minilora.memory import LLAMA_PROJECTIONS

    return AdaLoRAConfig(target_modules=list(LLAMA_PROJECTIONS), init_r=INIT_R, target_r=TARGET_R, total_steps=steps)


def peft_config(ours):
    """The same AdaLoRA as peft spells it."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(task_type="CAUSAL_LM", target_modules=ours.target_modules, init_r=ours.init_r,
                         target_r=ours.target_r, tinit=ours.t_init, tfinal=ours.t_final, deltaT=ours.delta_t,
                         total_step=ours.total_steps, beta1=ours.beta1, beta2=ours.beta2,
                         orth_reg_weight=ours.orth_reg_weight, lora_alpha=ours.lora_alpha,
                         lora_dropout=ours.lora_dropout)


# ---- one measured run: load, then tune ----

def measure(load, tune, config, seq_len, device):
    """load() -> model, then tune(model, batches) -> (first loss, last loss); peak memory of each (added to what was
    in use before the load), wall times, and seconds per step (median of the steps after the first two)."""
    baseline = reset_peak_memory(device)
    start = time.perf_counter()
    model = load()
    synchronize(device)
    loaded = time.perf_counter()
    result = {"before_load": baseline, "load_seconds": loaded - start, "load_peak": peak_memory(device) - baseline}
    reset_peak_memory(device)
    batches = SyncedTimes(random_batches(config.vocab_size, seq_len), device)
    first_loss, last_loss = tune(model, batches)
    synchronize(device)
    ends = [*batches.times[1:], time.perf_counter()]
    steps = [end - begin for begin, end in zip(batches.times, ends, strict=True)]
    return {**result, "train_peak": peak_memory(device) - baseline, "steps": len(steps), "first_step_seconds": steps[0],
            "step_seconds": statistics.median(steps[2:] or steps), "first_loss": first_loss, "last_loss": last_loss}


def run_minilora(config, steps, seq_len, device, dtype):
    from minilora.adalora import add_adalora
    from minilora.qlora import load_quantized
    from minilora.tune import train

    def tune(model, batches):
        adalora = adalora_config(steps)
        model, allocator = add_adalora(model, adalora)
        log = train(model, batches, train_settings(steps), allocator, progress=False)
        return tuple(record["loss"] + adalora.orth_reg_weight * record["orth"] for record in (log[0], log[-1]))

    return measure(lambda: load_quantized(config, device=device, compute_dtype=dtype), tune, config, seq_len, device)


def reference_model(config, device, dtype):
    """The model as transformers + bitsandbytes build it from a checkpoint, the checkpoint being minilora's stream of
    random tensors: every Linear but the head becomes a Linear4bit (NF4, double quantization) on the meta device,
    then each tensor is put in place as it arrives, a projection weight quantized on `device` on the way."""
    from bitsandbytes.nn import Linear4bit, Params4bit
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear

    from minilora.qlora import empty_model, random_tensors, set_tensor

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = replace_with_bnb_linear(empty_model(config, dtype), ["lm_head"], quantization)
    for key, tensor in random_tensors(model, config, seed=0):
        module = model.get_submodule(key.rpartition(".")[0])
        tensor = tensor.to(device, dtype)
        if isinstance(module, Linear4bit):  # transformers' Bnb4bitQuantize: quantized by moving it to the device
            module.weight = Params4bit(tensor, requires_grad=False, **module.weight.__dict__).to(device)
        else:
            set_tensor(model, key, tensor)
        del tensor  # before the next one is drawn: one tensor at a time
    for module in model.modules():  # the buffers (rotary frequencies) were built for real, on the CPU
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.is_loaded_in_4bit = True  # what from_pretrained sets: peft then wraps Linear4bit in its SVDLinear4bit
    return model.requires_grad_(False)


def run_reference(config, steps, seq_len, device, dtype):
    from peft import get_peft_model

    def tune(model, batches):
        settings = train_settings(steps)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, peft_config(adalora_config(steps)))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        model.train()
        losses = []
        for step in range(1, steps + 1):  # minilora.tune.train's step, as peft's AdaLoRA asks for it
            loss = model(**{k: v.to(device) for k, v in next(batches).items()}).loss  # peft adds γ·penalty
            loss.backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
        return losses[0], losses[-1]

    return measure(lambda: reference_model(config, device, dtype), tune, config, seq_len, device)


def run_tiny_tune(device, steps, eval_examples):
    """minilora.tune.run with RunConfig's defaults (the bundled tiny Llama and data), on `device`."""
    from minilora.tune import RunConfig, TrainSettings, run

    with tempfile.TemporaryDirectory() as directory:
        config = RunConfig(device=str(device), output_dir=str(Path(directory) / "tune"), eval_examples=eval_examples,
                           train=TrainSettings(steps=steps))
        start = time.perf_counter()
        _, summary = run(config, progress=False)
        synchronize(device)
        return {**summary, "seconds": time.perf_counter() - start}


def timed_calls(function, device, calls=DEQUANTIZE_CALLS, warm_up=3):
    """The median seconds of one call of function(), after warm_up calls (which include any compilation)."""
    for _ in range(warm_up):
        function()
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_dequantize(config, device, dtype, backend):
    """One MLP projection's weight dequantized by minilora eager, minilora compiled, and bitsandbytes."""
    import bitsandbytes.functional as bnbf

    from minilora.nf4 import dequantize_nf4, quantize_nf4

    weight = torch.randn(config.intermediate_size, config.hidden_size, generator=torch.Generator().manual_seed(0))
    weight = weight.to(device, dtype)
    ours = quantize_nf4(weight, double_quant=True)
    theirs, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    eager = dequantize_nf4(ours, dtype)
    return {"shape": tuple(weight.shape), "backend": backend,
            "identical": torch.equal(dequantize_nf4(ours, dtype, compiled=backend), eager),
            "eager": timed_calls(lambda: dequantize_nf4(ours, dtype), device),
            "compiled": timed_calls(lambda: dequantize_nf4(ours, dtype, compiled=backend), device),
            "bitsandbytes": timed_calls(lambda: bnbf.dequantize_4bit(theirs, state), device)}


# ---- the report ----

def stack_lines(result, memory):
    return [f"memory: {memory}, less the {result['before_load'] / MIB:.1f} MiB in use before the load",
            f"load: {result['load_seconds']:.1f} s, peak memory {result['load_peak'] / MIB:.1f} MiB",
            f"training: peak memory {result['train_peak'] / MIB:.1f} MiB (the record reset after the load)",
            f"seconds per step: {result['step_seconds']:.4f} (median of steps 3..{result['steps']}; step 1: "
            f"{result['first_step_seconds']:.3f} s)",
            f"loss (task + γ·orthogonal penalty): step 1 {result['first_loss']:.4f}, step {result['steps']} "
            f"{result['last_loss']:.4f}"]


def minilora_lines(result, memory, plan):
    return [*stack_lines(result, memory),
            f"memory plan: predicted peak {plan.peak / MIB:.1f} MiB; measured / predicted = "
            f"{result['train_peak'] / plan.peak:.3f}", "", "memory plan:", str(plan)]


def ratio_lines(ours, theirs):
    pairs = [("training peak memory", "train_peak"), ("seconds per step", "step_seconds"),
             ("load peak memory", "load_peak"), ("load time", "load_seconds"),
             ("step-1 loss (the same weights and batch: near 1)", "first_loss")]
    return ["minilora / reference (same run):"] + [f"  {label}: {ours[key] / theirs[key]:.3f}" for label, key in pairs]


def tune_lines(summary):
    before, after = summary["before"], summary["after"]
    return [f"held-out loss: before {before['eval_loss']:.4f}, after {after['eval_loss']:.4f}",
            f"exact match: before {before['exact_match']:.1%}, after {after['exact_match']:.1%}",
            f"final budget: {summary['final_budget']} triplets; wall time: {summary['seconds']:.1f} s"]


def dequantize_lines(result):
    bnb = result["bitsandbytes"]
    return [f"matrix {result['shape'][0]} x {result['shape'][1]}; median of {DEQUANTIZE_CALLS} calls; compiled values "
            f"bit-identical to eager: {'yes' if result['identical'] else 'NO'}",
            f"seconds per call: eager {result['eager']:.6f}, compiled ({result['backend']}) {result['compiled']:.6f}, "
            f"bitsandbytes {bnb:.6f}",
            f"minilora / bitsandbytes (same run): eager {result['eager'] / bnb:.3f}, "
            f"compiled {result['compiled'] / bnb:.3f}"]


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the CPU rehearsal: a tiny Llama, a few steps (default: "
                        "off, the full check on a GPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda; cpu with --reduced)")
    parser.add_argument("--output", type=Path, default=None, help="the report file (default: bench/results/gpu_check_"
                        "<device name>.txt, or ..._reduced.txt)")
    args = parser.parse_args()
    sizes = REDUCED if args.reduced else FULL
    device_name = args.device or ("cpu" if args.reduced else "cuda")

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        advice = "torch sees no CUDA GPU here: run this on one, or rehearse on the CPU with --reduced"
        if args.device:
            sys.exit(advice)
        print(f"skipped: {advice} (`make bench` runs every bench script; --device cuda makes this an error)")
        return
    if device.type == "cpu":
        fix_mmap_threshold(64)  # so that the resident set follows what the program holds (bench/memory_plan.py)
    from transformers import LlamaConfig

    from minilora.architectures import resolve_config

    quiet()
    dtype = compute_dtype(device)
    config = LlamaConfig(**TINY) if args.reduced else resolve_config(sizes["model"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    output = args.output or RESULTS / f"gpu_check_{slug(name)}{'_reduced' if args.reduced else ''}.txt"
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the peak RSS (VmHWM)"
    lines = []

    def emit(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)

    emit(f"GPU check{' (REDUCED: the CPU rehearsal, a tiny model; the numbers mean nothing)' if args.reduced else ''}",
         f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
         f"device: {describe_device(device)}", f"versions: {versions()}",
         f"model: {sizes['model']} architecture ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
         f"MLP {config.intermediate_size}), random weights; NF4 + double quantization on the seven projections; "
         f"AdaLoRA init_r {INIT_R} -> target_r {TARGET_R} on all of them; batch 1 x {sizes['seq_len']} tokens; "
         f"gradient checkpointing; {str(dtype).removeprefix('torch.')} compute; {sizes['steps']} optimizer steps; "
         f"lr {LR}")
    results, failed = {}, []
    begin = time.perf_counter()

    def section(title, key, function, *rest):
        emit("", f"== {title}")
        start = time.perf_counter()
        try:
            results[key] = function(*rest)
        except Exception as error:  # report it and go on: one GPU session should bring back every part it can
            traceback.print_exc()
            failed.append(key)
            emit(f"FAILED: {type(error).__name__}: {error}")
        else:
            emit(f"(this part's wall time: {time.perf_counter() - start:.1f} s)")

    common = (config, sizes["steps"], sizes["seq_len"], device, dtype)
    section("1. minilora: load_quantized + add_adalora + minilora.tune.train (PagedAdamW)", "minilora",
            run_minilora, *common)
    if "minilora" in results:
        plan = planned(config, 1, sizes["seq_len"], device=device.type, dtype_bytes=dtype.itemsize)
        emit(*minilora_lines(results["minilora"], memory, plan))
    section("2. reference: transformers + bitsandbytes Linear4bit + peft AdaLoRA + torch.optim.AdamW", "reference",
            run_reference, *common)
    if "reference" in results:
        emit(*stack_lines(results["reference"], memory))
        if "minilora" in results:
            emit(*ratio_lines(results["minilora"], results["reference"]))
    section(f"3. the default tiny tune: minilora.tune.run, {sizes['tune_steps']} steps, "
            f"{sizes['tune_eval_examples']} held-out examples", "tune", run_tiny_tune, device, sizes["tune_steps"],
            sizes["tune_eval_examples"])
    if "tune" in results:
        emit(*tune_lines(results["tune"]))
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    section(f"4. dequantizing one MLP projection: minilora eager, compiled ({backend}), bitsandbytes", "dequantize",
            run_dequantize, config, device, dtype, backend)
    if "dequantize" in results:
        emit(*dequantize_lines(results["dequantize"]))
        if not results["dequantize"]["identical"]:
            failed.append("dequantize (compiled values differ)")
    emit("", f"total wall time: {time.perf_counter() - begin:.1f} s",
         f"verdict: {'FAILED: ' + ', '.join(failed) if failed else 'every part ran'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"written to {output}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
