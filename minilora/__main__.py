"""Command line: `python -m minilora <command>` (run with --help for the list)."""

import argparse
import sys
from pathlib import Path

from minilora.memory import LLAMA_PROJECTIONS

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


def cmd_plan(args):
    from minilora.architectures import resolve_config
    from minilora.memory import RunSettings, plan_memory

    settings = RunSettings(batch_size=args.batch_size, seq_len=args.seq_len, init_r=args.init_r,
                           target_modules=tuple(args.target_modules), double_quant=not args.no_double_quant,
                           compute_bytes=2 if args.compute_dtype == "bfloat16" else 4,
                           gradient_checkpointing=not args.no_gradient_checkpointing,
                           optimizer_resident_bytes=args.resident_mib * 2**20 if args.resident_mib else None)
    print(f"memory plan: {args.model}, batch {args.batch_size} x {args.seq_len} tokens, init_r {args.init_r}")
    print(plan_memory(resolve_config(args.model), settings))
    return 0


def cmd_tune(args):
    from dataclasses import fields

    from minilora.tune import RunConfig, TrainSettings, run

    given = {key: value for key, value in vars(args).items() if key not in ("command", "no_progress", "debug")}
    train_keys = {f.name for f in fields(TrainSettings)}
    train = TrainSettings(**{k: v for k, v in given.items() if k in train_keys})
    config = RunConfig(**{k: v for k, v in given.items() if k not in train_keys}, train=train)
    config.check()
    ranks = f"AdaLoRA rank {config.init_r} -> {config.target_r}" if config.method == "adalora" else \
        f"LoRA rank {config.target_r}"
    print(f"tuning {config.model} on {config.data or 'the bundled instruction set'} ({config.device}): {train.steps} "
          f"optimizer steps of {train.batch_size} x {train.grad_accum} examples, {ranks}")
    _, summary = run(config, progress=not args.no_progress)
    print(f"{'':<8}{'held-out loss':>14}{'exact match':>13}")
    for when in ("before", "after"):
        result = summary[when]
        print(f"{when:<8}{result['eval_loss']:>14.3f}{result['exact_match']:>13.1%}")
    budget = f"final budget {summary['final_budget']} triplets, " if "final_budget" in summary else ""
    print(f"{budget}{summary['trainable_parameters']:,} trainable parameters; adapter and log in {config.output_dir}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("env", help="versions, threads, GPU and bf16 speed, with a verdict per requirement")
    add_tune_parser(sub)
    plan = sub.add_parser("plan", help="bytes by component of a QLoRA+AdaLoRA run, from the model's config alone")
    plan.add_argument("--model", default="llama-2-7b", help="llama-2-7b, llama-2-13b, a checkpoint dir or a hub id")
    plan.add_argument("--batch-size", type=int, default=1)
    plan.add_argument("--seq-len", type=int, default=512)
    plan.add_argument("--init-r", type=int, default=12)
    plan.add_argument("--target-modules", nargs="+", default=list(LLAMA_PROJECTIONS))
    plan.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    plan.add_argument("--no-double-quant", action="store_true")
    plan.add_argument("--no-gradient-checkpointing", action="store_true")
    plan.add_argument("--resident-mib", type=int, default=0, help="PagedAdamW resident budget (0: all resident)")
    stu = sub.add_parser("student", help="for instructors: write student editions (solutions removed) of the notebooks")
    stu.add_argument("--out", type=Path, default=REPO / "student")
    grad = sub.add_parser("graduate", help="for maintainers: write the package's taught modules from the notebooks")
    grad.add_argument("--check", action="store_true", help="only report modules that differ; exit 1 if any")
    nbs = sub.add_parser("notebooks", help="for maintainers: re-execute notebooks in place (all of them by default)")
    nbs.add_argument("paths", nargs="*", type=Path)
    return parser


def add_tune_parser(sub):
    """`tune`'s options, their defaults taken from RunConfig and TrainSettings (one source for the CLI and the API)."""
    from minilora.tune import RunConfig, TrainSettings

    run, train = RunConfig(), TrainSettings()
    tune = sub.add_parser("tune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="QLoRA+AdaLoRA-tune a model end to end (default: the bundled tiny model and data)")
    tune.add_argument("--model", default=run.model, help="checkpoint dir, hub id, or llama-2-7b (random weights)")
    tune.add_argument("--data", default=run.data, help="a .jsonl file or a hub data set id (None: the bundled set)")
    tune.add_argument("--output-dir", default=run.output_dir, help="where the adapter and the log are written")
    tune.add_argument("--method", choices=["adalora", "lora"], default=run.method, help="lora: rank target_r")
    tune.add_argument("--init-r", type=int, default=run.init_r, help="AdaLoRA's initial rank per layer")
    tune.add_argument("--target-r", type=int, default=run.target_r, help="AdaLoRA's final average rank per layer")
    tune.add_argument("--max-length", type=int, default=run.max_length, help="tokens per record (prompt + answer)")
    tune.add_argument("--eval-examples", type=int, default=run.eval_examples,
                      help="held-out examples for loss and exact match")
    tune.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT_DIR/merged")
    tune.add_argument("--no-quantize", dest="quantize", action="store_false",
                      help="keep the base in float32 (quantize: %(default)s)")
    tune.add_argument("--device", default=run.device, help="cuda or cpu")
    tune.add_argument("--steps", type=int, default=train.steps, help="optimizer steps (AdaLoRA's total_steps)")
    tune.add_argument("--batch-size", type=int, default=train.batch_size, help="examples per micro-batch")
    tune.add_argument("--grad-accum", type=int, default=train.grad_accum, help="micro-batches per optimizer step")
    tune.add_argument("--lr", type=float, default=train.lr, help="learning rate")
    tune.add_argument("--eval-every", type=int, default=train.eval_every,
                      help="also evaluate on the validation split every N steps (0: never)")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    tune.add_argument("--seed", type=int, default=train.seed, help="seeds the adapters, the data order and the split")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")


COMMANDS = {"env": cmd_env, "plan": cmd_plan, "tune": cmd_tune, "graduate": cmd_graduate, "notebooks": cmd_notebooks,
            "student": cmd_student}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:  # a setting or a file the user gave: say what, not where
        if getattr(args, "debug", False):
            raise
        print(f"python -m minilora {args.command}: error: {error} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
