"""Command line: `python -m minilora <command>` (run with --help for the list)."""

import argparse
import os
import sys
from pathlib import Path

from torch import OutOfMemoryError

from minilora.tune import RECIPES, RunConfig, TrainSettings, recipe

REPO = Path(__file__).resolve().parent.parent


def cmd_env(args):
    from minilora import env

    return env.main()


def cmd_graduate(args):
    from minilora import graduate

    if args.check:
        problems = graduate.check(REPO)
        for problem in problems:
            print("drift:", problem)
        print("graduation check:", "FAILED" if problems else "every graduated module matches its notebook")
        return 1 if problems else 0
    changed = graduate.write(REPO)
    print("\n".join(f"wrote {module}" for module in changed) or "every graduated module was up to date")
    return 0


def cmd_notebooks(args):
    from minilora import workbook

    paths = args.paths or sorted((REPO / "notebooks").glob("*.ipynb"))
    for path in paths:
        print(f"executing {path} ...", flush=True)
        workbook.execute_in_place(path)
    return 0


def cmd_student(args):
    from minilora import workbook

    for path in workbook.write_student_editions(REPO / "notebooks", args.out):
        print(f"wrote {path}")
    return 0


def cmd_label(args):
    from minilora import workbook

    for path in args.paths or sorted((REPO / "notebooks").glob("*.ipynb")):
        changed = workbook.write_nbgrader_metadata(path)
        print(f"{'labelled' if changed else 'up to date'}: {path}")
    return 0


def cmd_grade(args):
    from minilora import workbook

    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: a notebook needs some seconds to run; give a positive number, "
                         "e.g. --timeout 900")
    if args.json is not None and not args.json.parent.is_dir():
        raise FileNotFoundError(f"--json {args.json}: its folder does not exist; create it, or name a file in an "
                                "existing folder")
    paths = workbook.gradable(args.paths)
    width = max(len(str(path)) for path in paths)
    print(f"{'notebook':<{width}}  {'exercise':<40}  {'points':>6}  {'result':<7}  message", flush=True)
    rows = []
    for path in paths:
        for row in workbook.grade(path, timeout=args.timeout):
            exercise = row["exercise"] if len(row["exercise"]) <= 40 else row["exercise"][:37] + "..."
            print(f"{row['notebook']:<{width}}  {exercise:<40}  {row['earned']:>2g}/{row['possible']:<3g}  "
                  f"{row['result']:<7}  {row['message']}".rstrip(), flush=True)
            rows.append(row)
    totals = workbook.grade_totals(rows)
    print(f"total: {totals['earned']:g}/{totals['possible']:g} points; {totals['passed']} of {totals['exercises']} "
          f"exercises passed, {totals['failed']} failed, {totals['not_run']} not run")
    if args.json is not None:
        workbook.write_json(args.json, {"exercises": rows, "totals": totals, "timeout_s": args.timeout})
        print(f"wrote {args.json}")
    return 0 if totals["passed"] == totals["exercises"] else 1


def run_config(args):
    """The RunConfig of `tune` or `plan` options: the same names, the same defaults."""
    from dataclasses import fields

    given = {**vars(args), "target_modules": tuple(args.target_modules)}
    train_keys, run_keys = ({f.name for f in fields(cls)} - {"train"} for cls in (TrainSettings, RunConfig))
    train = TrainSettings(**{k: v for k, v in given.items() if k in train_keys})
    return RunConfig(**{k: v for k, v in given.items() if k in run_keys}, train=train)


def print_plan(config):
    from minilora.architectures import resolve_config
    from minilora.memory import plan_memory

    if not config.quantize:
        print("no memory plan: it counts NF4-quantized target layers, and this run keeps them unquantized")
        return
    plan, train = plan_memory(resolve_config(config.model), config.memory_settings()), config.train
    print(f"memory plan: {config.model}, batch {train.batch_size} x {config.max_length} tokens, {config.method} rank "
          f"{config.init_r if config.method == 'adalora' else config.target_r}, {config.device}")
    print(plan)


def cmd_plan(args):
    config = run_config(args)
    config.check(here=False)
    print_plan(config)
    return 0


def cmd_tune(args):
    from dataclasses import asdict

    from minilora import distributed
    from minilora.data import BASE_MODEL_DIR, load_tokenizer
    from minilora.tune import model_directory, prepared_splits, run

    config = run_config(args)
    config.check()
    if args.dry_run:
        tokenizer = load_tokenizer(model_directory(config.model, weights=False) or BASE_MODEL_DIR)
        records, _, _ = prepared_splits(config, tokenizer)
        print("records: " + ", ".join(f"{len(split):,} {name}" for name, split in records.items()))
        settings = asdict(config.resolved())
        settings.update(settings.pop("train"))
        for key, value in settings.items():
            print(f"{key:<24}{value}")
        print_plan(config)
        return 0
    train, processes = config.train, int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it in each process
    ranks = f"AdaLoRA rank {config.init_r} -> {config.target_r}" if config.method == "adalora" else \
        f"LoRA rank {config.target_r}"
    if os.environ.get("RANK", "0") == "0":
        where = config.device if processes == 1 else f"{config.device}, {processes} processes"
        print(f"tuning {config.model} on {config.data or 'the bundled instruction set'} ({where}): {train.steps} "
              f"optimizer steps of {train.batch_size} x {train.grad_accum} examples{' each' * (processes > 1)}, "
              f"{ranks}")
    _, summary = run(config, progress=not args.no_progress)
    distributed.stop()
    if summary is None:  # a process of a torchrun run other than the first: the first reports
        return 0
    print(f"{'':<8}{'held-out loss':>14}{'exact match':>13}")
    for when in ("before", "after"):
        result = summary[when]
        print(f"{when:<8}{result['eval_loss']:>14.3f}{result['exact_match']:>13.1%}")
    budget = f"final budget {summary['final_budget']} triplets, " if "final_budget" in summary else ""
    print(f"{budget}{summary['trainable_parameters']:,} trainable parameters; adapter, settings (run.json) and log in "
          f"{config.output_dir}")
    return 0


def build_parser(defaults=None):
    """The command line; `tune` and `plan` take their defaults from `defaults` (a RunConfig; RunConfig() if None)."""
    defaults = defaults or RunConfig()
    parser = argparse.ArgumentParser(prog="python -m minilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("env", help="versions, threads, GPU and bf16 speed, with a verdict per requirement")
    add_tune_parser(sub, defaults)
    plan = sub.add_parser("plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="bytes by component of the run `tune` would do with the same options, from the model's "
                               "config alone")
    add_run_options(plan, defaults)
    stu = sub.add_parser("student", help="for instructors: write student editions (solutions removed) of the notebooks")
    stu.add_argument("--out", type=Path, default=REPO / "student")
    grade = sub.add_parser("grade", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="for instructors and self-learners: run notebooks and report each exercise passed, "
                                "failed or not run (exit status 0 only if every exercise passed)",
                           description="Run each notebook in a fresh kernel, cell by cell, going on after a cell that "
                                       "raises; an exercise passes when its check cell runs without error. Exit "
                                       "status: 0 every exercise passed, 1 some did not, 2 bad input.")
    grade.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="notebook files, or directories (every *.ipynb in them)")
    grade.add_argument("--timeout", type=int, default=900, metavar="SECONDS",
                       help="seconds one notebook may run in all; exercises it did not reach are 'not run'")
    grade.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="also write the rows and totals to FILE as JSON (replacing it as a whole)")
    grade.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    grad = sub.add_parser("graduate", help="for maintainers: write the package's taught modules from the notebooks")
    grad.add_argument("--check", action="store_true", help="only report modules that differ; exit 1 if any")
    lab = sub.add_parser("label", help="for maintainers: write the nbgrader metadata of every exercise's solution "
                                       "and check cells (all notebooks by default)")
    lab.add_argument("paths", nargs="*", type=Path)
    nbs = sub.add_parser("notebooks", help="for maintainers: re-execute notebooks in place (all of them by default)")
    nbs.add_argument("paths", nargs="*", type=Path)
    return parser


def add_tune_parser(sub, run):
    train = run.train
    tune = sub.add_parser("tune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="QLoRA+AdaLoRA-tune a model end to end (default: the bundled tiny model and data)")
    add_run_options(tune, run)
    tune.add_argument("--data", default=run.data, help="a .jsonl, .json or .csv file, a directory of split files, or "
                                                       "a hub data set id (None: the bundled set)")
    tune.add_argument("--output-dir", default=run.output_dir, help="where the adapter, run.json and the log go")
    tune.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run's results (or an unfinished run's checkpoints) in OUTPUT_DIR")
    tune.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                      help="continue the unfinished run in OUTPUT_DIR from its latest checkpoint, or from CHECKPOINT")
    tune.add_argument("--checkpoint-every", type=int, default=train.checkpoint_every, metavar="N",
                      help="save a checkpoint every N optimizer steps into OUTPUT_DIR/checkpoints (0: only on Ctrl-C)")
    tune.add_argument("--eval-examples", type=int, default=run.eval_examples,
                      help="held-out examples for loss and exact match")
    tune.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT_DIR/merged")
    tune.add_argument("--steps", type=int, default=train.steps, help="optimizer steps (AdaLoRA's total_steps)")
    tune.add_argument("--grad-accum", type=int, default=train.grad_accum, help="micro-batches per optimizer step")
    tune.add_argument("--lr", type=float, default=train.lr, help="learning rate (QLoRA used 2e-4 for 7B)")
    tune.add_argument("--warmup-ratio", type=float, default=train.warmup_ratio,
                      help="the learning rate rises linearly over this fraction of the steps, then stays constant")
    tune.add_argument("--max-grad-norm", type=float, default=train.max_grad_norm, help="gradient clipping norm")
    tune.add_argument("--eval-every", type=int, default=train.eval_every,
                      help="also evaluate on the validation split every N steps (0: never)")
    tune.add_argument("--seed", type=int, default=train.seed, help="seeds the adapters, the data order and the split")
    tune.add_argument("--dry-run", action="store_true",
                      help="check everything, read the data, print the resolved settings and the memory plan; no "
                           "model is loaded and nothing is written")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")


def add_run_options(parser, run):
    """The options `tune` and `plan` share, their defaults taken from `run` (a RunConfig)."""
    train = run.train
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="start from a named recipe's settings (qlora-7b: QLoRA's for a 7B model, with AdaLoRA); "
                             "options you give still win, and --help shows the recipe's values after --recipe")
    parser.add_argument("--model", default=run.model,
                        help="checkpoint dir, hub id owner/name, or llama-2-7b / -13b / -70b (random weights)")
    parser.add_argument("--method", choices=["adalora", "lora"], default=run.method, help="lora: rank target_r")
    parser.add_argument("--target-modules", nargs="+", default=list(run.target_modules),
                        help="the layer types that get adapters (and NF4 weights)")
    parser.add_argument("--init-r", type=int, default=run.init_r, help="AdaLoRA's initial rank per layer")
    parser.add_argument("--target-r", type=int, default=run.target_r, help="AdaLoRA's final average rank per layer")
    parser.add_argument("--lora-alpha", type=float, default=run.lora_alpha, help="scaling numerator (alpha / r)")
    parser.add_argument("--max-length", type=int, default=run.max_length,
                        help="tokens per record (prompt, answer, end); longer records are left out and counted")
    parser.add_argument("--batch-size", type=int, default=train.batch_size, help="examples per micro-batch")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=train.gradient_checkpointing, help="recompute activations in backward")
    parser.add_argument("--no-quantize", dest="quantize", action="store_false",
                        help="keep the base unquantized (quantize: %(default)s)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="store the NF4 constants in float32 (double_quant: %(default)s)")
    parser.add_argument("--resident-bytes", type=int, default=train.resident_bytes,
                        help="PagedAdamW keeps at most this many bytes of states on the device (None: all of them)")
    parser.add_argument("--device", default=run.device, help="cuda or cpu")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default=run.compute_dtype,
                        help="None: float32 on a CPU, bfloat16 on a GPU that has it, else float16 (with loss scaling)")
    parser.add_argument("--compile-dequantize", action="store_true", default=run.compile_dequantize,
                        help="fuse each NF4 dequantization into one kernel with torch.compile (for a GPU; the first "
                             "steps wait while it compiles)")


COMMANDS = {"env": cmd_env, "plan": cmd_plan, "tune": cmd_tune, "graduate": cmd_graduate, "notebooks": cmd_notebooks,
            "student": cmd_student, "grade": cmd_grade, "label": cmd_label}


def main(argv=None):
    first = argparse.ArgumentParser(add_help=False)  # a recipe gives the other options their defaults (and --help)
    first.add_argument("--recipe")
    name = first.parse_known_args(argv)[0].recipe
    args = build_parser(recipe(name) if name in RECIPES else None).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as interrupted:
        if getattr(args, "debug", False):
            raise
        saved = str(interrupted)  # training saved a checkpoint after the first Ctrl-C and says so
        print(f"python -m minilora {args.command}: {saved or 'interrupted'}; results appear only when complete, so "
              "none were written and an earlier run's results are as they were", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, OutOfMemoryError) as error:  # the user's to fix
        if getattr(args, "debug", False):
            raise
        if isinstance(error, OutOfMemoryError):
            error = (f"the GPU ran out of memory ({str(error).splitlines()[0]}): lower --batch-size or --max-length, "
                     "or use --gradient-checkpointing or --resident-bytes; `plan` with the same options shows where "
                     "the bytes go")
        print(f"python -m minilora {args.command}: error: {error} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
