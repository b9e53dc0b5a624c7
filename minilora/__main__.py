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


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, threads, GPU and bf16 speed, with a verdict per requirement")
    grad = sub.add_parser("graduate", help="write the package's taught modules from the notebooks")
    grad.add_argument("--check", action="store_true", help="only report modules that differ; exit 1 if any")
    nbs = sub.add_parser("notebooks", help="re-execute notebooks in place (all of them by default)")
    nbs.add_argument("paths", nargs="*", type=Path)
    stu = sub.add_parser("student", help="write student editions (solutions removed) of every notebook")
    stu.add_argument("--out", type=Path, default=REPO / "student")
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
    return parser


COMMANDS = {"env": cmd_env, "plan": cmd_plan, "graduate": cmd_graduate, "notebooks": cmd_notebooks,
            "student": cmd_student}


def main(argv=None):
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
