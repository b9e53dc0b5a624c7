"""The capstone's controls (notebook 09): AdaLoRA against LoRA at the same final budget over several seeds and two
run lengths, and QLoRA against LoRA on the float32 base, with validation curves, a per-task breakdown and the
final AdaLoRA ranks.

Every run is one `minilora.tune.run` on the bundled tiny Llama and instruction set, float32 compute on the CPU,
one torch thread, with RunConfig's defaults except the fields named here (the settings of notebook 09's tune):

- AdaLoRA: init_r 6 pruned to an average of target_r 4 on all 28 projections (final budget 112 triplets);
  LoRA: `method="lora"`, rank 4 on the same 28 projections (112 rank-one pieces).
- lora_alpha: RunConfig's 12 for both, as notebook 09 tunes. The adapters' output is scaled by lora_alpha / r for
  LoRA (12 / 4 = 3) but by lora_alpha / init_r for AdaLoRA (12 / 6 = 2), as peft defines them, so one lora_alpha
  gives LoRA the larger step. The scaling-matched control: LoRA with lora_alpha 8 (8 / 4 = 2, AdaLoRA's scale),
  on the NF4 base at the long run length only.
- quantize=True: the projections of the base in NF4 with double quantization (QLoRA); quantize=False: the same
  base in float32, not quantized.
- seeds: `TrainSettings.seed`, which sets the adapters' initialization and the batch order (the splits are the
  bundled files, the same for every seed).
- two run lengths, in optimizer steps: 150 (notebook 09's) and a longer one (--long-steps, 300 by default, the
  length notebook 09 suggests trying). AdaLoRA's schedule scales with the run (minilora.tune.add_adapters leaves
  t_init and t_final to AdaLoRAConfig's defaults: t_init = steps // 10, t_final = 3 * steps // 10): at 150 steps
  the budget falls from step 16 to step 104, the final mask is taken at step 105 and the pattern it leaves trains
  for 45 steps; at 300 steps the budget phase runs from step 31 to 209 and the kept triplets train for 90 steps
  after the final mask at step 210 (at 600: 180 steps after the mask at 420). The fraction after the final mask
  stays 30%; what grows is the number of steps the pruned adapters get to recover, and the number of steps
  LoRA gets too, so the longer comparison asks whether the reallocated budget helps once both have had time
  to fit, not who recovers faster from pruning. (The authors' GLUE settings keep the pattern fixed for
  thousands of steps: t_f = 1,800 to 50,000 steps, arXiv 2303.10512 appendix table 8.)

Measured per run (written to capstone_controls.json, one entry per run):

    before, after  = held-out loss and exact match on the first 200 test records (RunConfig.eval_examples),
                     before the adapters are added and after training, as `run` reports them
    curve          = the training loss of every optimizer step, and the held-out loss on the first 200
                     validation records every --eval-every steps (`run`'s log)
    per_task       = exact match on the same 200 test records, split by the records' "task" field
                     (greedy answers of the returned model, the decoding `run`'s exact match uses)
    lora_alpha     = the run's lora_alpha: 12 (RunConfig's), or 8 for the scaling-matched LoRA
    ranks          = AdaLoRA's final rank of each adapted projection
    final_parameters = the parameters the adapters keep: AdaLoRA sum of rank x (out + in + 1), LoRA r x (out + in)
    seconds        = wall time of the `run` call, with --jobs runs side by side (not a speed benchmark)

The report (capstone_controls.txt) gives, per (method, lora_alpha, base, steps), the mean over seeds with the
sample standard deviation and the range (min-max), the paired differences (same seed) AdaLoRA - LoRA,
AdaLoRA - LoRA α=8, LoRA α=8 - LoRA α=12 and QLoRA - float32, each with a verdict from a paired t statistic
(n - 1 degrees of freedom, two-sided 5%), the per-task exact match and the final ranks averaged over seeds by
projection type and by layer.

    .venv/bin/python bench/capstone_controls.py [--long-steps 300] [--seeds 0 1 2] [--jobs 2]
    (the committed report: 14.8 minutes with --jobs 3 on a 2-core machine shared with other work, then the three
    scaling-matched runs added with --add-to; --reduced: a few steps and examples, only to check that it runs;
    --report-from FILE [--total-minutes M]: the report of the runs in a .json or a .partial.jsonl it wrote, without
    running them again; --add-to FILE.json [--total-minutes M]: run only the planned runs that file lacks, matched
    by method, base, seed, steps and lora_alpha, and report them all: the runs are deterministic on one machine,
    which re-running LoRA seed 0 at 150 steps confirmed bit for bit before the matched runs were added)

Writes bench/results/capstone_controls.txt and .json (or --output, with .txt and .json suffixes).
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_plan import quiet  # noqa: E402
from seven_b_cpu import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "capstone_controls"
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # 97.5%
MAIN_TASKS = ("reverse", "sort", "uppercase", "length")
ALPHA = 12  # RunConfig's lora_alpha, for both methods: LoRA's scaling 12 / 4 = 3, AdaLoRA's 12 / 6 = 2
MATCHED_ALPHA = 8  # LoRA's lora_alpha for the scaling-matched control: 8 / 4 = 2 = AdaLoRA's 12 / 6


def start_worker():
    import torch

    torch.set_num_threads(1)
    quiet()


def one_run(method, quantize, seed, steps, eval_every, eval_examples, workdir, lora_alpha=ALPHA):
    """One `minilora.tune.run`, and what the report needs from it (a dict of the JSON's "runs" shape). The caller
    sets the thread count (measure's workers: one each)."""
    from minilora.data import (
        BASE_MODEL_DIR,
        INSTRUCTIONS_DIR,
        fit_to_length,
        generate_responses,
        load_instructions,
        load_tokenizer,
    )
    from minilora.memory import linear_shapes
    from minilora.tune import RunConfig, TrainSettings, first, run

    output = Path(workdir) / f"{method}-{'nf4' if quantize else 'f32'}-{steps}-alpha{lora_alpha}-seed{seed}"
    config = RunConfig(output_dir=str(output), method=method, quantize=quantize, eval_examples=eval_examples,
                       lora_alpha=float(lora_alpha), device="cpu",
                       train=TrainSettings(steps=steps, seed=seed, eval_every=eval_every))
    started = time.perf_counter()
    model, summary = run(config, progress=False)
    seconds = time.perf_counter() - started
    log = json.loads((output / "log.json").read_text())["log"]

    # the records `run` evaluated on: its own splits, the first eval_examples of test; their "task" field, which
    # the loader does not keep, from the bundled file
    tokenizer = load_tokenizer(BASE_MODEL_DIR)
    kept, _, _, _ = fit_to_length(load_instructions(config.data, split="test"), tokenizer, config.max_length)
    test = first(kept, eval_examples)  # what run's prepared_splits keeps of the bundled test file
    answers = generate_responses(model, tokenizer, test)
    task_of = record_tasks(INSTRUCTIONS_DIR / "test.jsonl")
    hits, counts = Counter(), Counter()
    for answer, record in zip(answers, test, strict=True):
        task = task_of[record["instruction"], record["input"], record["output"]]
        counts[task] += 1
        hits[task] += answer.strip() == record["output"].strip()
    overall = sum(hits.values()) / len(test)
    if abs(overall - summary["after"]["exact_match"]) > 1e-12:
        raise RuntimeError(f"per-task answers give exact match {overall}, run reported "
                           f"{summary['after']['exact_match']}: the breakdown is not of the same answers")

    shape = {kind: (out_f, in_f) for kind, out_f, in_f in linear_shapes(model.config)}
    ranks = summary.get("ranks")
    if ranks is not None:
        final = sum(rank * (sum(shape[name.split(".")[-1]]) + 1) for name, rank in ranks.items())
    else:
        final = summary["trainable_parameters"]
    return {"method": method, "quantize": quantize, "seed": seed, "steps": steps, "lora_alpha": lora_alpha,
            "trainable_parameters": summary["trainable_parameters"], "final_parameters": final,
            "before": {k: summary["before"][k] for k in ("eval_loss", "exact_match")},
            "after": {k: summary["after"][k] for k in ("eval_loss", "exact_match")},
            "per_task": {task: hits[task] / counts[task] for task in sorted(counts)},
            "curve": [{"step": r["step"], "loss": round(r["loss"], 5),
                       "eval_loss": round(r["eval_loss"], 5) if "eval_loss" in r else None} for r in log],
            "ranks": ranks,
            "seconds": round(seconds, 1),
            "_task_counts": dict(counts)}  # for the report only; dropped from the JSON


def record_tasks(path):
    """{(instruction, input, output): task} of a .jsonl file with a "task" field; refuses a record that appears
    under two tasks."""
    tasks = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        key = (row["instruction"], row.get("input") or "", row["output"])
        if tasks.setdefault(key, row["task"]) != row["task"]:
            raise ValueError(f"{path}: {key} appears under the tasks {tasks[key]} and {row['task']}")
    return tasks


def planned_runs(short, long, seeds):
    """(method, quantize, seed, steps, lora_alpha), the main comparisons first (if the bench is stopped, what it
    finished says most): AdaLoRA and LoRA on the NF4 base at the long count, the scaling-matched LoRA there,
    LoRA on the float32 base at the long count, both on the NF4 base at the short count, and AdaLoRA on the float32
    base last."""
    runs = [(m, True, s, long, ALPHA) for s in seeds for m in ("adalora", "lora")]
    runs += [("lora", True, s, long, MATCHED_ALPHA) for s in seeds]
    runs += [("lora", False, s, long, ALPHA) for s in seeds]
    runs += [(m, True, s, short, ALPHA) for s in seeds for m in ("adalora", "lora")]
    runs += [("adalora", False, s, long, ALPHA) for s in seeds]
    return runs


def run_key(r):
    """What identifies a run: (method, quantize, seed, steps, lora_alpha); a run recorded before the lora_alpha
    field was RunConfig's 12."""
    return r["method"], r["quantize"], r["seed"], r["steps"], r.get("lora_alpha", ALPHA)


def measure(short, long, seeds, eval_every, eval_examples, jobs, progress=print, partial=None, done=()):
    """Every planned run whose run_key is not in `done`, `jobs` at a time; each finished run is also appended to
    `partial` (JSON lines)."""
    with tempfile.TemporaryDirectory() as workdir, \
            ProcessPoolExecutor(max_workers=jobs, initializer=start_worker) as pool:
        futures = [pool.submit(one_run, m, q, s, n, eval_every, eval_examples, workdir, a)
                   for m, q, s, n, a in planned_runs(short, long, seeds) if (m, q, s, n, a) not in done]
        results = []
        for future in as_completed(futures):
            results.append(future.result())
            r = results[-1]
            if partial is not None:
                with partial.open("a") as file:
                    file.write(json.dumps(r) + "\n")
            progress(f"{label(r['method'], r['lora_alpha']):<8} {'NF4' if r['quantize'] else 'f32'} "
                     f"steps {r['steps']:>4} seed {r['seed']}: "
                     f"held-out loss {r['after']['eval_loss']:.4f}, exact match {r['after']['exact_match']:.3f} "
                     f"({r['seconds']:.0f} s)", flush=True)
    return results


# ---- the report -------------------------------------------------------------------------------------------------

def spread(values, digits=3):
    """'mean ± sample std (min–max)'."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def paired(name, a_runs, b_runs, key, lower_is_better, digits=3):
    """The verdict line for a - b, paired by seed."""
    b_by_seed = {r["seed"]: r for r in b_runs}
    diffs = [a["after"][key] - b_by_seed[a["seed"]]["after"][key] for a in a_runs if a["seed"] in b_by_seed]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    better = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    worse = sum((d > 0) if lower_is_better else (d < 0) for d in diffs)
    if n < 2:
        verdict = "one seed: no test"
    elif std == 0:
        verdict = "identical on every seed" if mean == 0 else "the same difference on every seed"
    else:
        t = mean / (std / math.sqrt(n))
        critical = T_CRITICAL.get(n - 1, 1.96)
        side = "better" if (t < 0) == lower_is_better else "worse"
        verdict = (f"t = {t:+.2f}, |t| > {critical} ({n - 1} d.f.): significantly {side}" if abs(t) > critical
                   else f"t = {t:+.2f}, |t| <= {critical} ({n - 1} d.f.): no significant difference")
    per_seed = ", ".join(f"{d:+.{digits}f}" for d in diffs)
    return (f"  {name} {key}: {mean:+.{digits}f} ± {std:.{digits}f} (per seed {per_seed}); "
            f"better on {better} of {n} seeds, worse on {worse}; {verdict}")


def group(runs, method, quantize, steps, lora_alpha=ALPHA):
    return sorted((r for r in runs if run_key(r)[:2] + run_key(r)[3:] == (method, quantize, steps, lora_alpha)),
                  key=lambda r: r["seed"])


def label(method, lora_alpha):
    """The report's name of a configuration: the method, and lora_alpha where it is not RunConfig's 12."""
    return method if lora_alpha == ALPHA else f"{method} α={lora_alpha}"


def report(runs, machine_line, torch_version, short, long, seeds, eval_every, eval_examples, total_seconds, jobs):
    lines = [f"machine: {machine_line}",
             f"torch {torch_version}, 1 thread per run, {jobs} runs side by side; total " + (
                 f"{total_seconds / 60:.1f} min" if total_seconds is not None else "not measured (report rebuilt)"),
             f"bundled tiny Llama + bundled instruction set; float32 compute on the CPU; RunConfig defaults "
             f"(batch 8, lr 5e-3, gamma 0.1, lora_alpha 12); seeds {', '.join(map(str, seeds))}",
             "scaling of the adapters' output: LoRA lora_alpha / r = 12 / 4 = 3, AdaLoRA lora_alpha / init_r = "
             "12 / 6 = 2 (one lora_alpha for both, as RunConfig and peft define them); the scaling-matched control "
             f"'lora α={MATCHED_ALPHA}': lora_alpha {MATCHED_ALPHA}, {MATCHED_ALPHA} / 4 = 2",
             f"held-out loss / exact match: first {eval_examples} test records after training; validation curve: "
             f"first {eval_examples} validation records every {eval_every} steps",
             "spread: mean ± sample standard deviation over seeds (min–max); paired differences are per seed "
             "(same batch order), tested with a paired t statistic",
             ""]
    base = {True: "NF4 (QLoRA)", False: "float32"}
    configs = [(m, q, n, a) for n in (short, long) for q in (True, False)
               for m, a in (("adalora", ALPHA), ("lora", ALPHA), ("lora", MATCHED_ALPHA)) if group(runs, m, q, n, a)]

    lines.append("== After training: held-out loss and exact match (test) ==")
    lines.append(f"{'method':<9}{'base':<13}{'steps':>6}  {'held-out loss':<30}{'exact match':<30}"
                 f"{'final params':>13}")
    for m, q, n, a in configs:
        g = group(runs, m, q, n, a)
        params = sorted({r["final_parameters"] for r in g})
        shown = str(params[0]) if len(params) == 1 else f"{min(params)}–{max(params)}"
        lines.append(f"{label(m, a):<9}{base[q]:<13}{n:>6}  {spread([r['after']['eval_loss'] for r in g]):<30}"
                     f"{spread([r['after']['exact_match'] for r in g]):<30}{shown:>13}")
    for q in (True, False):  # before training the adapters change nothing: one value per base
        befores = {(r["before"]["eval_loss"], r["before"]["exact_match"]) for r in runs if r["quantize"] == q}
        lines += [f"(before training, {base[q]} base: held-out loss {loss:.3f}, exact match {em:.3f})"
                  for loss, em in sorted(befores)]
    lines.append("")

    lines.append("== AdaLoRA - LoRA at the same final budget (112 triplets / rank-one pieces), paired by seed ==")
    for q, n in sorted({(q, n) for _, q, n, _ in configs}, key=lambda x: (x[1], not x[0])):
        a, b = group(runs, "adalora", q, n), group(runs, "lora", q, n)
        if a and b:
            lines.append(f" {base[q]}, {n} steps:")
            lines.append(paired("AdaLoRA - LoRA", a, b, "eval_loss", True))
            lines.append(paired("AdaLoRA - LoRA", a, b, "exact_match", False))
        b = group(runs, "lora", q, n, MATCHED_ALPHA)
        if a and b:
            lines.append(f" {base[q]}, {n} steps, LoRA with AdaLoRA's output scale (lora_alpha {MATCHED_ALPHA}, "
                         f"{MATCHED_ALPHA} / 4 = 12 / 6):")
            lines.append(paired(f"AdaLoRA - LoRA α={MATCHED_ALPHA}", a, b, "eval_loss", True))
            lines.append(paired(f"AdaLoRA - LoRA α={MATCHED_ALPHA}", a, b, "exact_match", False))
            c = group(runs, "lora", q, n)
            if c:
                lines.append(paired(f"LoRA α={MATCHED_ALPHA} - LoRA α={ALPHA}", b, c, "eval_loss", True))
                lines.append(paired(f"LoRA α={MATCHED_ALPHA} - LoRA α={ALPHA}", b, c, "exact_match", False))
    lines.append("")

    lines.append("== QLoRA (NF4 base) - the same method on the float32 base, paired by seed ==")
    for m in ("lora", "adalora"):
        for n in (short, long):
            a, b = group(runs, m, True, n), group(runs, m, False, n)
            if a and b:
                lines.append(f" {m}, {n} steps:")
                lines.append(paired("NF4 - float32", a, b, "eval_loss", True))
                lines.append(paired("NF4 - float32", a, b, "exact_match", False))
                seed_std = statistics.stdev(r["after"]["eval_loss"] for r in b) if len(b) > 1 else 0.0
                diff = statistics.fmean(r["after"]["eval_loss"] for r in a) - statistics.fmean(
                    r["after"]["eval_loss"] for r in b)
                lines.append(f"  |mean loss difference| {abs(diff):.3f} against the float32 runs' seed-to-seed std "
                             f"{seed_std:.3f}: {'within' if abs(diff) <= seed_std else 'outside'} the seed spread")
    lines.append("")

    counts = runs[0]["_task_counts"]
    others = [t for t in sorted(counts) if t not in MAIN_TASKS]
    lines.append("== Exact match per task (test records, mean over seeds) ==")
    header = "".join(f"{t + f' ({counts.get(t, 0)})':>16}" for t in MAIN_TASKS)
    lines.append(f"{'method':<9}{'base':<13}{'steps':>6}{header}{f'other ({sum(counts[t] for t in others)})':>14}")
    for m, q, n, a in configs:
        g = group(runs, m, q, n, a)
        row = "".join(f"{statistics.fmean(r['per_task'].get(t, 0.0) for r in g):>16.3f}" for t in MAIN_TASKS)
        other = statistics.fmean(sum(r["per_task"][t] * counts[t] for t in others) / max(1, sum(
            counts[t] for t in others)) for r in g)
        lines.append(f"{label(m, a):<9}{base[q]:<13}{n:>6}{row}{other:>14.3f}")
    lines.append(f"(other: {', '.join(f'{t} {counts[t]}' for t in others)} records)")
    lines.append("")

    lines.append(f"== Validation loss during training (mean over seeds, every {eval_every} steps; "
                 f"training loss: mean of the {eval_every} steps before) ==")
    for m, q, n, a in configs:
        g = group(runs, m, q, n, a)
        points = [c["step"] for c in g[0]["curve"] if c["eval_loss"] is not None]
        stride = math.ceil(len(points) / 8)  # at most 8 points, ending at the last
        shown = points[len(points) - 1 - (len(points) - 1) // stride * stride::stride]
        if points and points[-1] not in shown:
            shown.append(points[-1])
        cells = []
        for step in shown:
            val = statistics.fmean(r["curve"][step - 1]["eval_loss"] for r in g)
            train = statistics.fmean(statistics.fmean(c["loss"] for c in r["curve"][max(0, step - eval_every):step])
                                     for r in g)
            cells.append(f"{step}: {val:.3f}/{train:.3f}")
        lines.append(f" {label(m, a):<9}{base[q]:<12}{n:>5} (validation/training)  " + "  ".join(cells))
    lines.append("")

    lines.append("== AdaLoRA's final ranks (start 6, mean 4), mean over seeds ==")
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for m, q, n, _ in configs:
        if m != "adalora":
            continue
        g = group(runs, m, q, n)
        layers = sorted({int(name.split(".")[2]) for name in g[0]["ranks"]})
        grid = {(layer, kind): statistics.fmean(r["ranks"][f"model.layers.{layer}.{part}.{kind}"] for r in g)
                for layer in layers for kind, part in zip(kinds, ["self_attn"] * 4 + ["mlp"] * 3, strict=True)}
        lines.append(f" {base[q]}, {n} steps:")
        lines.append(f"  {'layer':<7}" + "".join(f"{k:>10}" for k in kinds) + f"{'mean':>8}")
        for layer in layers:
            row = [grid[layer, k] for k in kinds]
            lines.append(f"  {layer:<7}" + "".join(f"{v:>10.2f}" for v in row) + f"{statistics.fmean(row):>8.2f}")
        col = [statistics.fmean(grid[layer, k] for layer in layers) for k in kinds]
        lines.append(f"  {'mean':<7}" + "".join(f"{v:>10.2f}" for v in col))
        attention = statistics.fmean(grid[layer, k] for layer in layers for k in kinds[:4])
        ffn = statistics.fmean(grid[layer, k] for layer in layers for k in kinds[4:])
        lines.append(f"  attention (q, k, v, o) mean {attention:.2f}; FFN (gate, up, down) mean {ffn:.2f}; "
                     f"bottom layer {statistics.fmean(grid[layers[0], k] for k in kinds):.2f}, "
                     f"top layer {statistics.fmean(grid[layers[-1], k] for k in kinds):.2f}")
        per_seed = [sorted(r["ranks"].items()) for r in g]
        same = all(p == per_seed[0] for p in per_seed)
        ffn_minus_attention, top_minus_rest = [], []
        for r in g:
            by = {(int(name.split(".")[2]), name.split(".")[-1]): rank for name, rank in r["ranks"].items()}
            ffn_minus_attention.append(statistics.fmean(by[layer, k] for layer in layers for k in kinds[4:])
                                       - statistics.fmean(by[layer, k] for layer in layers for k in kinds[:4]))
            top_minus_rest.append(statistics.fmean(by[layers[-1], k] for k in kinds)
                                  - statistics.fmean(by[layer, k] for layer in layers[:-1] for k in kinds))
        lines.append(f"  per seed: FFN - attention mean rank {', '.join(f'{d:+.2f}' for d in ffn_minus_attention)}; "
                     f"top layer - the layers below {', '.join(f'{d:+.2f}' for d in top_minus_rest)}")
        lines.append(f"  the same pattern on every seed: {'yes' if same else 'no'}")
    lines.append("")
    lines.append("seconds per run (side by side, not a speed measurement): " + ", ".join(
        f"{label(m, a)} {'NF4' if q else 'f32'} {n}: "
        f"{statistics.fmean(r['seconds'] for r in group(runs, m, q, n, a)):.0f}" for m, q, n, a in configs))
    return "\n".join(lines) + "\n"


def write_json(path, runs, machine_line, capability, torch_version):
    head = {"machine": machine_line, "capability": capability, "torch": torch_version, "threads": 1}
    parts = [json.dumps(head, ensure_ascii=False)[:-1] + ', "runs": [']
    order = ["method", "quantize", "seed", "steps", "lora_alpha"]  # then the rest as one_run returns them
    entries = [json.dumps({k: r[k] for k in order + [k for k in r if k not in order and not k.startswith("_")]},
                          ensure_ascii=False) for r in runs]
    text = parts[0] + "\n" + ",\n".join(entries) + "\n]}\n"  # one run per line: readable diffs, small file
    json.loads(text)
    path.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short-steps", type=int, default=150)
    parser.add_argument("--long-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs side by side")
    parser.add_argument("--reduced", action="store_true", help="2 and 4 steps, one seed, 8 examples: a rehearsal")
    parser.add_argument("--output", type=Path, default=RESULTS, help="path without suffix: .txt and .json")
    parser.add_argument("--report-from", type=Path, help="write the report of these runs instead of running")
    parser.add_argument("--total-minutes", type=float, help="with --report-from: the bench's total time, to report")
    parser.add_argument("--add-to", type=Path, help="a .json this bench wrote: run only the planned runs it lacks, "
                        "then report them all (with --total-minutes: that file's total, to which this run's adds)")
    args = parser.parse_args()
    if args.reduced:
        args.short_steps, args.long_steps, args.seeds = 2, 4, [0]
        args.eval_every, args.eval_examples, args.jobs = 2, 8, 1

    import torch

    import minilora.tune  # noqa: F401  (imported once here: the forked workers inherit it)
    from minilora.data import INSTRUCTIONS_DIR

    quiet()
    started = time.perf_counter()
    partial = args.output.with_suffix(".partial.jsonl")
    earlier = []
    if args.report_from or args.add_to:  # runs measured before (or an interrupted bench's finished ones)
        path = args.report_from or args.add_to
        text = path.read_text()
        earlier = json.loads(text)["runs"] if path.suffix == ".json" else [
            json.loads(line) for line in text.splitlines()]
        lines = (INSTRUCTIONS_DIR / "test.jsonl").read_text().splitlines()[:args.eval_examples]
        counts = Counter(json.loads(line)["task"] for line in lines)  # a JSON's runs lack them (all fit max_length)
        for r in earlier:
            r.setdefault("_task_counts", dict(counts))
            r.setdefault("lora_alpha", ALPHA)  # runs recorded before the field: RunConfig's 12
        started = None if args.total_minutes is None else time.perf_counter() - 60 * args.total_minutes
    runs = earlier
    if not args.report_from:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        runs = earlier + measure(args.short_steps, args.long_steps, args.seeds, args.eval_every, args.eval_examples,
                                 args.jobs, partial=partial, done={run_key(r) for r in earlier})
    runs.sort(key=lambda r: (r["steps"], not r["quantize"], r["method"], r["seed"]))
    total = None if started is None else time.perf_counter() - started
    machine_line = machine()
    capability = torch.backends.cpu.get_cpu_capability()
    text = report(runs, machine_line, torch.__version__, args.short_steps, args.long_steps, args.seeds,
                  args.eval_every, args.eval_examples, total, args.jobs)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".txt").write_text(text)
    write_json(args.output.with_suffix(".json"), runs, machine_line, capability, torch.__version__)
    if not args.report_from:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
