"""Checkpoints: everything a run needs to continue exactly where it stopped, written whole or not at all.

A checkpoint is one file, state.pt, in output_dir/checkpoints/step-NNNNNN: the trainable weights, PagedAdamW's
state, the rank allocator's state (importance averages, pattern, history), every process's random-number states,
the step (which also says how far into the data order the run got), the log so far, float16's loss scale, and the
resolved settings it was made with. It is written into a staging directory and renamed into place, so a run killed
while it saves leaves the previous checkpoint as the latest complete one. The last KEEP are kept, and all of them
are deleted once the run's results are written: checkpoints exist only for a run that has not finished.

Resuming from one with `train` gives the same weights, pattern and log, bit for bit, as never stopping (on the same
machine, thread count and number of processes), because every input of the next step is restored.
"""

import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from minilora import distributed
from minilora.outputs import RUN_FILE

KEEP = 2
STATE_FILE = "state.pt"
# settings that may change between a run and its resumption: where it writes, what it does after training, how
# often it evaluates or saves, how it pages, the device (the compute dtype is compared), float16's starting scale
MAY_CHANGE = {"output_dir", "overwrite", "resume", "merge", "compile_dequantize", "device", "train.eval_every",
              "train.checkpoint_every", "train.resident_bytes", "train.page_bytes", "train.loss_scale"}


def checkpoints_dir(output_dir):
    return Path(output_dir).expanduser() / "checkpoints"


def step_of(path):
    return int(path.name.removeprefix("step-"))


def complete(directory):
    """The complete checkpoints in directory, oldest first (a staging directory is not one)."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("step-*") if re.fullmatch(r"step-\d+", path.name)
             and (path / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def find_checkpoint(output_dir, resume):
    """The checkpoint directory a run resumes from: resume="latest" takes output_dir's newest, else resume is one."""
    if resume == "latest":
        found = complete(checkpoints_dir(output_dir))
        if not found and (Path(output_dir).expanduser() / RUN_FILE).exists():
            raise ValueError(f"resume='latest': the run in {output_dir} finished (its results are there), so there "
                             "is nothing to resume: start a new run in another directory, or pass --overwrite")
        if not found:
            raise ValueError(f"resume='latest': {checkpoints_dir(output_dir)} holds no complete checkpoint: run "
                             "without --resume to start, or name a checkpoint directory with --resume PATH")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume={resume!r}: not a checkpoint directory (no {STATE_FILE} in it): name one such as "
                         f"{checkpoints_dir(output_dir) / 'step-000100'}, or pass --resume alone for the latest")
    return path


def check_checkpoints(output_dir, resume, overwrite):
    """Refuse to resume what is not there, and to start afresh over an unfinished run's checkpoints unless asked."""
    if resume is not None and overwrite:
        raise ValueError("resume and overwrite are both set: --resume continues the run in output_dir, --overwrite "
                         "starts a new one there; choose one")
    if resume is not None:
        find_checkpoint(output_dir, resume)
        return
    found = complete(checkpoints_dir(output_dir))
    if found and not overwrite:
        raise ValueError(f"output_dir={str(output_dir)!r} holds the checkpoints of an unfinished run (latest: "
                         f"{found[-1].name}): pass --resume to continue it, or --overwrite to start again")


def flat(settings, prefix=""):
    """{"train.steps": 300, ...}: nested settings as one level of dotted names."""
    items = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return items


def check_same_run(saved, settings):
    """Refuse to resume a checkpoint with settings that change the run, naming each difference."""
    before, now = flat(saved), flat(settings)
    changed = [f"{name}={before.get(name)!r} (now {now.get(name)!r})" for name in sorted(before.keys() | now.keys())
               if name not in MAY_CHANGE and before.get(name) != now.get(name)]
    if changed:
        raise ValueError(f"resume: the checkpoint was made with {', '.join(changed)}: resume with the settings it "
                         "was made with, or start a new run in another output directory")


def load_checkpoint(path):
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot read the checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}): "
                         "resume from an earlier one with --resume PATH") from error


def rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Checkpointer:
    """Saves the training state into output_dir/checkpoints every `every` optimizer steps (0: never) and after the
    step in which Ctrl-C was pressed (see finish_step_on_ctrl_c), and restores a saved one (`state`) into a run.
    `train` calls restore() once and after_step() after each step; `context` goes into every checkpoint as is."""

    def __init__(self, output_dir, every=0, state=None, context=None):
        self.directory = checkpoints_dir(output_dir)
        self.every, self.state, self.context = every, state, context or {}
        self.interrupted = False

    def restore(self, model, optimizer, allocator):
        """Put the saved state into model, optimizer and allocator; return (next step, log, loss scale)."""
        state = self.state
        if state["world_size"] != distributed.world_size():
            raise ValueError(f"resume: the checkpoint was made by {state['world_size']} processes and this run has "
                             f"{distributed.world_size()}: resume with the same number (torchrun --nproc_per_node)")
        trainable = dict(trainable_parameters(model))
        with torch.no_grad():
            for name, saved in state["adapters"].items():
                trainable[name].copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        if allocator is not None:
            allocator.load_state_dict(state["allocator"])
        set_rng_states(state["rng"][distributed.rank()])
        if distributed.rank() == 0:  # later checkpoints belong to the continuation this run replaces
            for later in complete(self.directory):
                if step_of(later) > state["step"]:
                    shutil.rmtree(later, ignore_errors=True)
        for copied in ("adapters", "optimizer", "allocator"):  # now in the run: free the loaded copies (~1 GB at 7B)
            del state[copied]
        return state["step"] + 1, list(state["log"]), state["loss_scale"]

    def after_step(self, step, log, scale, model, optimizer, allocator, total_steps):
        """Save a checkpoint when one is due or Ctrl-C was pressed (then raise KeyboardInterrupt saying how to go on).
        No periodic checkpoint after the last step: the run's results come next."""
        stop = distributed.any_rank(self.interrupted)
        due = self.every and step % self.every == 0 and step < total_steps
        if not (stop or due):
            return
        state = {"step": step, "log": log, "loss_scale": scale, "world_size": distributed.world_size(),
                 "adapters": {name: p.detach().cpu() for name, p in trainable_parameters(model)},
                 "optimizer": optimizer.state_dict(), "allocator": allocator.state_dict() if allocator else None,
                 "rng": distributed.gather(rng_states()), **self.context}
        if distributed.rank() == 0:
            self.save(step, state)
        if stop:
            raise KeyboardInterrupt(f"interrupted after step {step} of {total_steps}; its checkpoint is "
                                    f"{self.path(step)}: run the same command with --resume to continue")

    def save(self, step, state):
        """Write state as step-NNNNNN atomically (staged, then renamed) and delete all but the last KEEP."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".partial-*"):  # left by a run killed while it saved
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.directory))
        try:
            torch.save(state, stage / STATE_FILE)
            os.replace(stage, self.path(step))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        for old in complete(self.directory)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)

    def path(self, step):
        return self.directory / f"step-{step:06d}"

    def clear(self):
        """Delete every checkpoint (the run finished, or a new one starts over an old one's with overwrite)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def trainable_parameters(model):
    """(name, parameter) for every parameter that trains."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@contextmanager
def finish_step_on_ctrl_c(checkpointer):
    """While the block runs, the first Ctrl-C (SIGINT) or SIGTERM (what a scheduler, a notebook host or torchrun
    sends before it kills a process) only sets checkpointer.interrupted, so the step in progress finishes and is
    saved; a second Ctrl-C stops at once. Outside the main thread signals cannot be caught: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_signal(signum, frame):
        checkpointer.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: finishing this step, then saving a "
              "checkpoint (Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)

    previous = {number: signal.signal(number, first_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
