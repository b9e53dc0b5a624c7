"""The same QLoRA + AdaLoRA tune with minilora and with transformers + bitsandbytes + peft: step time, peak memory
and the final evaluations, in one run.

Both stacks tune the bundled tiny Llama on the bundled instruction data with the settings of `make tune`
(RunConfig's defaults: NF4 with double quantization on the seven projections, AdaLoRA init_r 6 -> target_r 4,
the same schedule, learning rate, batch, clipping and seed, float32 compute on the CPU), see the same batches in
the same order and are evaluated by the same function (held-out loss and exact match on the test split).

- minilora: minilora.tune's load_model, add_adapters and train (NF4Linear, SVDLinear, PagedAdamW).
- reference: transformers' from_pretrained with a BitsAndBytesConfig (bitsandbytes' Linear4bit), peft's AdaLoRA
  (it adds the orthogonal penalty inside the forward) and bitsandbytes' PagedAdamW (unpaged on a CPU), trained by a
  loop that mirrors minilora.tune.train step for step; update_and_allocate gets the same step numbers.
  On a CPU with AVX512-BF16, Linear4bit's inference forward (eval mode, no grad) first repacks the weight for a
  fused kernel, and with bitsandbytes 0.50 that repacking fails when in_features is not a multiple of the block
  size (the tiny model's down_proj has 352 = 5.5 x 64 inputs: "shape '[128, 5]' is invalid for input of size
  704"). The reference therefore keeps Linear4bit on its generic path (dequantize, then matmul), the path it
  trains on anyway and the one minilora's NF4Linear takes.

Each tune runs in a fresh process with one thread. It first runs a 2-step tune of its own stack (paying once for
lazily loaded code and tables), then resets the kernel's peak-RSS record and runs the measured tune. Memory and the
evaluations come from one tune per stack, one at a time, with glibc's mmap threshold fixed at 64 KiB, as in
bench/memory_plan.py: freed blocks go back to the system, so the resident set follows what the program holds (with
glibc's default the peak of the same tune varied by half from run to run, with what the heap happened to keep).
That setting makes every large allocation a system call, so the step times come from other tunes, with glibc's
default malloc: in each of --rounds rounds the two stacks run side by side, one thread each (keep 2 x --threads
within the cores), so that whatever else loads the machine slows both alike (one after the other, the same tune's
median step time moved by a third between runs on this shared machine). Each stack keeps its fastest round.
Reported:

    step time   = the median time of one optimizer step (forward, backward, clipping, optimizer, allocator), from
                  the moments the loop draws its batches
    peak memory = peak RSS during the measured tune (load, evaluations, training) - RSS at the reset
    quality     = exact match and held-out loss after tuning, compared only where bitsandbytes reads the
                  reference's weights correctly: on CPUs with AVX-512 its 0.50 CPU dequantizer misreads rows that
                  are not a whole number of blocks (checked on the machine the bench runs on)

    .venv/bin/python bench/qlora_stack.py [--steps 300] [--rounds 2] [--threads 1]   (about 6 minutes)

Writes its report to bench/results/qlora_stack.txt (or --output) as well.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

from memory_plan import MMAP_THRESHOLD, REPO, quiet, reset_peak, status_bytes
from seven_b_cpu import machine

MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results" / "qlora_stack.txt"


def tune_minilora(config, evaluate, batches):
    import torch

    from minilora.tune import add_adapters, load_model, train

    torch.manual_seed(config.train.seed)  # the adapters' initialization, as in minilora.tune.run
    model, _ = load_model(config)
    before = evaluate(model)
    model, allocator = add_adapters(model, config)
    train(model, batches, config.train, allocator, progress=False)
    return {"before": before, "after": evaluate(model), "final_budget": allocator.budget}


def reference_model(config):
    """The bundled model through transformers + bitsandbytes: Linear4bit (NF4, double quantization) projections."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_use_double_quant=config.double_quant)
    model = AutoModelForCausalLM.from_pretrained(config.model, quantization_config=quantization, dtype=torch.float32,
                                                 device_map=config.device).eval()
    for module in model.modules():  # see the module docstring: bitsandbytes' packed CPU path fails on this model
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def misread_weights(model):
    """The Linear4bit layers whose weight bitsandbytes dequantizes differently from the same codes and constants
    read as one flat row (the order they were quantized in), and the largest difference."""
    import copy

    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    differences = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state
            flat = copy.copy(state)
            flat.shape = torch.Size([state.shape.numel()])
            as_shaped = dequantize_4bit(module.weight.data, state)
            as_flat = dequantize_4bit(module.weight.data, flat).reshape(state.shape)
            differences[name] = (as_shaped - as_flat).abs().max().item()
    return [name for name, d in differences.items() if d > 0], max(differences.values())


def tune_reference(config, evaluate, batches):
    import torch
    from bitsandbytes.optim import PagedAdamW
    from peft import AdaLoraConfig, get_peft_model

    from minilora.adalora import AdaLoRAConfig

    torch.manual_seed(config.train.seed)
    model = reference_model(config)
    before = evaluate(model)
    ours = AdaLoRAConfig(target_modules=list(config.target_modules), init_r=config.init_r, target_r=config.target_r,
                         total_steps=config.train.steps, lora_alpha=config.lora_alpha,
                         orth_reg_weight=config.orth_reg_weight)  # resolves the schedule's defaults
    model = get_peft_model(model, AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=ours.target_modules, init_r=ours.init_r, target_r=ours.target_r,
        tinit=ours.t_init, tfinal=ours.t_final, deltaT=ours.delta_t, total_step=ours.total_steps, beta1=ours.beta1,
        beta2=ours.beta2, orth_reg_weight=ours.orth_reg_weight, lora_alpha=ours.lora_alpha,
        lora_dropout=ours.lora_dropout))
    settings = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    for step in range(1, settings.steps + 1):
        model(**next(batches)).loss.backward()  # the loss includes the orthogonal penalty
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    pattern = model.peft_config["default"].rank_pattern
    return {"before": before, "after": evaluate(model), "final_budget": sum(sum(kept) for kept in pattern.values())}


TUNES = {"minilora": tune_minilora, "reference": tune_reference}


def measure(stack, steps, eval_examples):
    """(In a fresh process.) A 2-step warm-up tune, then the measured tune of `stack`; its results and peak RSS."""
    from transformers import AutoTokenizer

    from minilora.data import collate, load_instructions, tokenize_record
    from minilora.tune import RunConfig, TrainSettings, endless_batches, evaluation

    quiet()
    defaults = RunConfig()
    tokenizer = AutoTokenizer.from_pretrained(defaults.model)
    splits = load_instructions(defaults.data)
    max_length = defaults.max_length
    train_set = [tokenize_record(r, tokenizer, max_length) for r in splits["train"]]
    results = []
    for n_steps, n_eval in ((2, 4), (steps, eval_examples)):
        config = RunConfig(train=TrainSettings(steps=n_steps), eval_examples=n_eval, device="cpu")
        evaluate = evaluation(tokenizer, splits["test"].select(range(n_eval)), max_length)
        batches = Timed(endless_batches(train_set, lambda rows: collate(rows, tokenizer.pad_token_id),
                                        config.train.batch_size, config.train.seed))
        baseline = reset_peak()
        results.append(TUNES[stack](config, evaluate, batches))
    gaps = [later - earlier for earlier, later in pairwise(batches.times)]
    return {**results[-1], "seconds": statistics.median(gaps), "peak": status_bytes("VmHWM") - baseline}


class Timed:
    """Batches that note when each one is drawn. Both loops draw one per optimizer step, at its start, so the gaps
    are step times, whatever the loop (its evaluations come before the first draw and after the last)."""

    def __init__(self, batches):
        self.batches, self.times = batches, []

    def __iter__(self):
        return self

    def __next__(self):
        self.times.append(time.perf_counter())
        return next(self.batches)


def run_children(stacks, args, mmap_threshold=None):
    """Tune each of `stacks` in its own fresh process, all at the same time; their results, by stack."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    processes = {stack: subprocess.Popen([sys.executable, __file__, "--child", stack, "--steps", str(args.steps),
                                          "--eval-examples", str(args.eval_examples)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
                 for stack in stacks}
    results = {}
    for stack, process in processes.items():
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the {stack} tune failed:\n{err[-3000:]}")
        results[stack] = json.loads(out.strip().splitlines()[-1])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=sorted(TUNES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.steps, args.eval_examples)))
        return
    lines = [f"machine: {machine()}", f"torch {torch_version()}, {args.threads} thread(s) per tune"]
    print("\n".join(lines), flush=True)
    measured = {}  # memory and evaluations: glibc's mmap threshold fixed, one tune at a time
    for stack in TUNES:
        measured.update(run_children([stack], args, mmap_threshold=MMAP_THRESHOLD))
        lines.append(f"memory  {stack:9s}: peak {measured[stack]['peak'] / MIB:6.1f} MiB (mmap threshold "
                     f"{MMAP_THRESHOLD // 1024} KiB)")
        print(lines[-1], flush=True)
    times = {stack: [] for stack in TUNES}  # step times: glibc's default malloc, both stacks at once
    for round_ in range(1, args.rounds + 1):
        for stack, result in run_children(TUNES, args).items():
            times[stack].append(result["seconds"])
            lines.append(f"round {round_} {stack:9s}: {1000 * times[stack][-1]:7.1f} ms/step (default malloc)")
            print(lines[-1], flush=True)
    best = {stack: {**measured[stack], "seconds": min(times[stack])} for stack in TUNES}
    summary = len(lines)
    lines += ["", f"bundled tiny Llama, {args.steps} steps, batch 8, float32 on the CPU; step time: the fastest of "
              f"{args.rounds} round(s); evaluated on {args.eval_examples} test examples",
              f"{'stack':10s}{'ms/step':>9s}{'peak MiB':>10s}{'loss before':>13s}{'loss after':>12s}"
              f"{'exact before':>14s}{'exact after':>13s}{'final budget':>14s}"]
    for stack, r in best.items():
        lines.append(f"{stack:10s}{1000 * r['seconds']:9.1f}{r['peak'] / MIB:10.1f}"
                     f"{r['before']['eval_loss']:13.3f}{r['after']['eval_loss']:12.3f}"
                     f"{r['before']['exact_match']:14.1%}{r['after']['exact_match']:13.1%}{r['final_budget']:14d}")
    time_ratio = best["minilora"]["seconds"] / best["reference"]["seconds"]
    memory_ratio = best["minilora"]["peak"] / best["reference"]["peak"]
    lines += ["", f"minilora / reference step time:   {time_ratio:.3f} "
              f"({'at least as fast' if time_ratio <= 1 else 'SLOWER'}; goal <= 1)",
              f"minilora / reference peak memory: {memory_ratio:.3f} "
              f"({'no more memory' if memory_ratio <= 1 else 'MORE memory'}; goal <= 1)"]
    quiet()
    from minilora.tune import RunConfig

    lines += quality_verdict(best, *misread_weights(reference_model(RunConfig(device="cpu"))))
    print("\n".join(lines[summary:]))
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"written to {args.output}")


def quality_verdict(best, misread, largest):
    """Compare the final quality only where the reference tunes the same base: bitsandbytes 0.50's native CPU
    dequantizer misreads rows that are not a whole number of blocks on CPUs where it takes its AVX-512 path."""
    if misread:
        return [f"bitsandbytes' CPU dequantizer misreads {len(misread)} of the reference's quantized weights on this "
                f"CPU ({', '.join(sorted({name.split('.')[-1] for name in misread}))}; largest error {largest:.3f}): "
                "the reference tunes a damaged base, so the final quality is not compared"]
    ours, theirs = best["minilora"]["after"], best["reference"]["after"]
    return ["bitsandbytes' CPU dequantizer reads every weight correctly on this CPU, so the final quality compares:",
            f"exact match after tuning: minilora {ours['exact_match']:.1%}, reference {theirs['exact_match']:.1%}; "
            f"held-out loss {ours['eval_loss']:.3f} against {theirs['eval_loss']:.3f}"]


def torch_version():
    import torch

    return torch.__version__

if __name__ == "__main__":
    main()
