"""Where a run's results go: complete or absent, and never over an earlier run's unless asked.

A run writes its results into a staging directory inside the output directory and moves them into place (a
rename on the same disk) only when all of them are written, so an interrupted run (Ctrl-C, a crash, a full disk)
leaves no half-written adapter and the earlier results as they were; the next run clears a stale staging
directory. Beside the adapter, run.json records what produced it: the resolved settings (model, data,
hyper-parameters, seed, quantization) and the versions of the libraries.
"""

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RUN_FILE = "run.json"
RESULTS = (RUN_FILE, "log.json", "adapter", "merged")
LIBRARIES = ("minilora", "torch", "transformers", "bitsandbytes", "peft", "safetensors", "datasets")


def check_output_dir(output_dir, overwrite=False):
    """Refuse an output directory that cannot be written, or that holds an earlier run's results unless overwrite."""
    out = Path(output_dir).expanduser()
    if not str(output_dir).strip():
        raise ValueError("output_dir='': name a directory for the results (runs/tune by default)")
    existing = next(path for path in (out, *out.parents) if path.exists() or path.is_symlink())
    if not existing.is_dir():
        what = "a broken link" if existing.is_symlink() and not existing.exists() else "a file"
        raise ValueError(f"output_dir={str(output_dir)!r}: {existing} is {what}, not a directory: choose another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir={str(output_dir)!r}: {existing} is not writable here: choose another directory")
    found = [name for name in RESULTS if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(f"output_dir={str(output_dir)!r} holds an earlier run ({', '.join(found)}): choose another "
                         "directory, or pass --overwrite (RunConfig.overwrite=True) to replace it")


@contextmanager
def staged(output_dir, overwrite=False):
    """Yield an empty staging directory to write results into; when the block ends without an error, replace the
    output directory's results by them (an earlier run's only if overwrite), else delete them."""
    out = Path(output_dir).expanduser()
    check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".partial-*"):  # left by a run killed while it wrote its results
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        yield stage
        for name in RESULTS:  # the earlier run's, all of them: a result this run does not write would be stale
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
        for item in stage.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def write_run_record(path, config, **facts):
    """Write the resolved settings of a run (a dataclass), library versions and any other facts as JSON."""
    versions = {"python": platform.python_version(), **{name: installed(name) for name in LIBRARIES}}
    record = {"settings": asdict(config), **facts, "versions": versions}
    Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")
