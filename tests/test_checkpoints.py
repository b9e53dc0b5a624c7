"""Checkpoints and resume: a run stopped and resumed ends bit for bit where one that never stopped ends; Ctrl-C
saves and says how to go on; a resume that would change the run is refused; the Trainer path resumes too."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch
import transformers

from minilora import AdaLoRAConfig, add_adalora, checkpoints
from minilora.__main__ import main
from minilora.checkpoints import KEEP, Checkpointer
from minilora.data import BASE_MODEL_DIR, collate, load_instructions, load_tokenizer, tokenize_record
from minilora.paged_optim import PagedAdamW
from minilora.tune import AdaLoRACallback, RunConfig, TrainSettings, run

STEPS = 8  # AdaLoRA's schedule at 8 steps masks at steps 1 to 6 and fixes the pattern after: both sides of 4


@pytest.fixture
def one_thread():
    """Bit-identical results need the same reduction order in both runs: one thread, as the issue's test asks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(out, **changes):
    train = TrainSettings(steps=STEPS, batch_size=4, **changes.pop("train", {}))
    return RunConfig(output_dir=str(out), eval_examples=4, train=train, **changes)


def results(out):
    """Everything a finished run leaves that must not depend on having stopped: the log (with the summary, the
    rank history and the before/after evaluations) and the adapter's files, byte for byte."""
    files = {path.name: path.read_bytes() for path in sorted((out / "adapter").iterdir())}
    return json.loads((out / "log.json").read_text()), files


def interrupt_at(step, monkeypatch):
    """Act as if Ctrl-C were pressed during `step` (the signal itself is tested with a real process below)."""
    after_step = Checkpointer.after_step

    def pressed(self, at, *args):
        self.interrupted = self.interrupted or at == step
        return after_step(self, at, *args)

    monkeypatch.setattr(Checkpointer, "after_step", pressed)


@pytest.mark.usefixtures("one_thread")
def test_stopped_and_resumed_equals_never_stopped_bit_for_bit(tmp_path, monkeypatch):
    run(config(tmp_path / "straight"), progress=False)
    with monkeypatch.context() as patch:
        interrupt_at(STEPS // 2, patch)
        with pytest.raises(KeyboardInterrupt, match=r"after step 4 of 8; its checkpoint is .*step-000004: run the "
                                                    r"same command with --resume"):
            run(config(tmp_path / "stopped", train=dict(checkpoint_every=1)), progress=False)
    saved = checkpoints.complete(tmp_path / "stopped" / "checkpoints")
    assert KEEP == 2 and [path.name for path in saved] == ["step-000003", "step-000004"], "the last KEEP are kept"
    assert not (tmp_path / "stopped" / "log.json").exists(), "no results from a run that did not finish"
    state = checkpoints.load_checkpoint(saved[-1])
    assert state["step"] == 4 and len(state["log"]) == 4 and state["allocator"]["rank_history"]
    with monkeypatch.context() as patch:  # resumed from the older one, then crashed: the newer one was abandoned
        patch.setattr("minilora.tune.accumulate", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run(config(tmp_path / "stopped", resume=str(saved[0])), progress=False)
    assert checkpoints.find_checkpoint(tmp_path / "stopped", "latest").name == "step-000003"
    run(config(tmp_path / "stopped", resume="latest"), progress=False)
    straight, resumed = results(tmp_path / "straight"), results(tmp_path / "stopped")
    assert resumed[0]["log"] == straight[0]["log"], "the per-step log"
    assert resumed[0]["summary"] == straight[0]["summary"], "the rank pattern, history and evaluations"
    assert resumed[1] == straight[1], "the adapter's weights and rank pattern, byte for byte"
    assert not (tmp_path / "stopped" / "checkpoints").exists(), "a finished run leaves no checkpoints"


@pytest.mark.usefixtures("one_thread")
def test_each_part_of_the_state_is_needed(tmp_path, monkeypatch):
    """Resuming without the optimizer's moments (as if only the adapter were saved) gives another run: the test
    above could not pass by chance."""
    run(config(tmp_path / "straight"), progress=False)
    with monkeypatch.context() as patch:
        interrupt_at(STEPS // 2, patch)
        with pytest.raises(KeyboardInterrupt):
            run(config(tmp_path / "stopped"), progress=False)
    monkeypatch.setattr("minilora.paged_optim.PagedAdamW.load_state_dict", lambda self, state: None)
    run(config(tmp_path / "stopped", resume="latest"), progress=False)
    assert results(tmp_path / "stopped")[0]["log"] != results(tmp_path / "straight")[0]["log"]


CHANGED = [  # (option, value): each changes the run a checkpoint was made in, so resuming with it is refused
    ("--steps", "10", "train.steps=8 (now 10)"),
    ("--init-r", "5", "init_r=6 (now 5)"),
    ("--lr", "0.001", "train.lr=0.005 (now 0.001)"),
    ("--max-length", "80", "max_length=96 (now 80)"),
    ("--target-modules", "q_proj", "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
     "'down_proj'] (now ['q_proj'])"),
]


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """An output directory holding an unfinished run's checkpoint (step 2 of 8), as the CLI leaves it."""
    out = tmp_path_factory.mktemp("unfinished")
    state = {"step": 2}
    original = Checkpointer.after_step

    def pressed(self, step, *args):
        self.interrupted = step == state["step"]
        return original(self, step, *args)

    Checkpointer.after_step = pressed
    try:
        assert main(["tune", "--steps", str(STEPS), "--batch-size", "4", "--eval-examples", "4", "--output-dir",
                     str(out), "--no-progress"]) == 130
    finally:
        Checkpointer.after_step = original
    return out


@pytest.mark.parametrize("option, value, named", CHANGED, ids=[c[0] for c in CHANGED])
def test_resuming_with_other_settings_is_refused_naming_the_difference(unfinished, option, value, named, capsys):
    argv = ["tune", "--steps", str(STEPS), "--batch-size", "4", "--eval-examples", "4", "--output-dir",
            str(unfinished), "--no-progress", "--resume", option, value]  # a repeated option: the last one counts
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and "\n" not in error, error


def test_an_unfinished_run_is_neither_restarted_nor_resumed_by_accident(unfinished, capsys, tmp_path):
    common = ["tune", "--steps", str(STEPS), "--batch-size", "4", "--eval-examples", "4", "--no-progress"]
    assert main([*common, "--output-dir", str(unfinished)]) == 2
    assert "holds the checkpoints of an unfinished run (latest: step-000002): pass --resume" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(unfinished), "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(tmp_path), "--resume", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{}")  # a finished run's results
    assert main([*common, "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "finished (its results are there), so there is nothing to resume" in capsys.readouterr().err
    assert checkpoints.complete(unfinished / "checkpoints"), "refusals delete nothing"


def test_an_unreadable_checkpoint_is_named_in_one_line(tmp_path, capsys):
    broken = tmp_path / "checkpoints" / "step-000002"
    broken.mkdir(parents=True)
    (broken / checkpoints.STATE_FILE).write_bytes(b"not a checkpoint")  # a disk error, a copy cut short
    assert main(["tune", "--steps", str(STEPS), "--batch-size", "4", "--eval-examples", "4", "--output-dir",
                 str(tmp_path), "--no-progress", "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"cannot read the checkpoint {broken}" in error and "\n" not in error, error


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    saver = Checkpointer(tmp_path)
    saver.save(1, {"step": 1})
    stale = tmp_path / "checkpoints" / ".partial-killed"  # what a run killed while saving leaves
    stale.mkdir()
    (tmp_path / "checkpoints" / "step-000002").mkdir()  # a directory without its state file
    assert checkpoints.find_checkpoint(tmp_path, "latest").name == "step-000001"
    for step in (2, 3, 4):
        saver.save(step, {"step": step})
    assert [p.name for p in checkpoints.complete(tmp_path / "checkpoints")] == ["step-000003", "step-000004"]
    assert not stale.exists(), "the next save clears what a killed one left"


def tune_command(out, *extra):
    return [sys.executable, "-m", "minilora", "tune", "--steps", "150", "--batch-size", "4", "--eval-examples", "4",
            "--output-dir", str(out), "--no-progress", *extra]


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def test_ctrl_c_finishes_the_step_saves_and_resume_ends_where_a_straight_run_ends(tmp_path):
    """A real SIGINT to a running `python -m minilora tune`: it exits 130 after saving the step it was in, says how
    to go on, and the resumed run's log and adapter equal those of a run never interrupted."""
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(tune_command(stopped, "--checkpoint-every", "10"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 240
    while not checkpoints.complete(stopped / "checkpoints"):  # training has begun once the first one is saved
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, err
    assert "Ctrl-C: finishing this step" in err and "run the same command with --resume to continue" in err, err
    step = int(checkpoints.complete(stopped / "checkpoints")[-1].name.removeprefix("step-"))
    assert 10 <= step < 150 and f"interrupted after step {step} of 150" in err, err
    resumed = subprocess.run(tune_command(stopped, "--resume"), capture_output=True, text=True, env=ONE_THREAD,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(tune_command(tmp_path / "straight"), capture_output=True, text=True, env=ONE_THREAD,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert results(stopped) == results(tmp_path / "straight")


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_callback_saves_and_restores_the_allocator_with_trainer_checkpoints(tmp_path):
    """transformers' Trainer, stopped at its checkpoint of step 4 and resumed with resume_from_checkpoint=True, ends
    with the allocator (scores, pattern, history) and the adapters of a Trainer run that never stopped."""
    tokenizer = load_tokenizer(BASE_MODEL_DIR)
    records = load_instructions(None)["train"].select(range(64))
    features = [tokenize_record(r, tokenizer, 96) for r in records]

    def trained(out, stop_at=None, resume=False):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32)
        adalora = AdaLoRAConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=4, total_steps=STEPS,
                                orth_reg_weight=0.1)
        model, allocator = add_adalora(model, adalora)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                                              learning_rate=5e-3, save_strategy="steps", save_steps=STEPS // 2,
                                              report_to=[], logging_strategy="no", use_cpu=True, seed=0,
                                              disable_tqdm=True)
        callback = AdaLoRACallback(model, allocator)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=features, callbacks=[callback],
                                       data_collator=lambda rows: collate(rows, tokenizer.pad_token_id))
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume or None)
        return model, allocator

    straight_model, straight = trained(tmp_path / "straight")
    trained(tmp_path / "stopped", stop_at=STEPS // 2)
    assert (tmp_path / "stopped" / f"checkpoint-{STEPS // 2}" / "adalora_allocator.pt").is_file()
    resumed_model, resumed = trained(tmp_path / "stopped", resume=True)
    assert resumed.rank_pattern == straight.rank_pattern and resumed.rank_history == straight.rank_history
    for key, value in straight.tracker.state_dict()["smoothed"].items():
        assert torch.equal(resumed.tracker.state_dict()["smoothed"][key], value), key
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_a_trainer_checkpoint_without_the_allocator_is_refused(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32)
    model, allocator = add_adalora(model, AdaLoRAConfig(target_modules=["q_proj"], total_steps=STEPS))
    (tmp_path / "checkpoint-4").mkdir()  # saved by a Trainer that had no AdaLoRACallback
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, report_to=[], use_cpu=True)
    state = transformers.TrainerState(global_step=4)
    with pytest.raises(ValueError, match="adalora_allocator.pt is missing: that checkpoint was saved without"):
        AdaLoRACallback(model, allocator).on_train_begin(args, state, transformers.TrainerControl())


class StopAt(transformers.TrainerCallback):
    """Ends training after `step` (Trainer saves that step's checkpoint first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_refusing_a_different_number_of_processes(tmp_path):
    saver = Checkpointer(tmp_path, state={"world_size": 2})
    with pytest.raises(ValueError, match="made by 2 processes and this run has 1: resume with the same number"):
        saver.restore(None, None, None)


def test_settings_that_do_not_change_the_run_may_change(tmp_path):
    made = config(tmp_path)
    moved = replace(made, merge=True, device="cuda", resume="latest", output_dir=str(tmp_path / "elsewhere"),
                    train=replace(made.train, checkpoint_every=5, eval_every=2, resident_bytes=2**20))
    checkpoints.check_same_run(asdict(made), asdict(moved))


def test_the_random_number_generator_continues_where_it_was_saved(tmp_path):
    """Dropout draws from torch's generator: a resumed run must draw what the uninterrupted one would have."""
    model = torch.nn.Linear(4, 4)
    optimizer = PagedAdamW(model.parameters(), page_bytes=64)
    Checkpointer(tmp_path, every=1).after_step(1, [], None, model, optimizer, None, total_steps=2)
    expected = torch.rand(8)
    torch.rand(100)  # the generator moves on
    state = checkpoints.load_checkpoint(checkpoints.find_checkpoint(tmp_path, "latest"))
    Checkpointer(tmp_path, state=state).restore(model, optimizer, None)
    assert torch.equal(torch.rand(8), expected)
