"""End to end: the CLI tune improves held-out results; the loop and the Trainer callback follow AdaLoRA's rules."""

import json
import math
import os
import re
import subprocess
import sys

import peft
import pytest
import torch
import transformers

from minilora import AdaLoRAConfig, add_adalora
from minilora.__main__ import build_parser, main
from minilora.adapter_io import export_peft, load_adapter, read_adapter_meta
from minilora.architectures import resolve_config
from minilora.data import BASE_MODEL_DIR, collate, load_instructions, tokenize_record, with_held_out
from minilora.memory import plan_memory
from minilora.paged_optim import PagedAdamW
from minilora.tune import (
    AdaLoRACallback,
    RunConfig,
    TrainSettings,
    add_adapters,
    endless_batches,
    evaluation,
    fitting_page_bytes,
    load_model,
    merge_adapters,
    optimizer_step,
    recipe,
    run,
    train,
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    command = [sys.executable, "-m", "minilora", "tune", "--steps", "120", "--eval-examples", "100",
               "--output-dir", str(out), "--no-progress"]
    # One thread: the model is tiny, and on a busy machine two threads make its small matrix products crawl.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def test_cli_tune_improves_held_out_loss_and_exact_match(cli_run):
    _, stdout = cli_run
    rows = dict(re.findall(r"^(before|after)\s+([\d.]+\s+[\d.]+)%", stdout, flags=re.M))
    (loss_before, match_before), (loss_after, match_after) = (map(float, rows[k].split()) for k in ("before", "after"))
    assert loss_after < loss_before - 2, stdout
    assert match_after >= match_before + 20, stdout  # percentage points on 100 held-out examples
    assert "final budget 112 triplets" in stdout


def test_the_run_writes_its_resolved_settings_and_its_adapter_exports_to_peft_later(cli_run, tmp_path):
    out, _ = cli_run
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["model"] == str(BASE_MODEL_DIR) and record["settings"]["train"]["steps"] == 120
    assert record["versions"]["torch"] == torch.__version__ and record["records"]["test"] == 300
    assert record["left_out_longer_than_max_length"] == {"train": 0, "validation": 0, "test": 0}
    assert not list(out.glob(".partial-*")), "no staging directory is left"
    model, _ = load_model(RunConfig(quantize=False))
    load_adapter(model, out / "adapter")
    export_peft(model, tmp_path / "peft", AdaLoRAConfig(**read_adapter_meta(out / "adapter")["config"]))
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str(BASE_MODEL_DIR)
    peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")  # finds its base by that name
    ids = torch.tensor([[1, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)


def test_saved_adapter_reloads_with_the_same_outputs(cli_run):
    out, _ = cli_run
    config = RunConfig(output_dir=str(out))
    reloaded, tokenizer = load_model(config)
    load_adapter(reloaded, out / "adapter")
    record = load_instructions(split="test")[0]
    batch = collate([tokenize_record(record, tokenizer)], tokenizer.pad_token_id)
    base, _ = load_model(config)
    with torch.no_grad():
        tuned_logits, base_logits = reloaded(**batch).logits, base(**batch).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3), "the adapter changes the model"
    assert reloaded(**batch).loss < base(**batch).loss


def test_run_on_a_jsonl_file_holds_out_records_and_validates_periodically(tmp_path):
    records = load_instructions(split="train").select(range(60))
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = RunConfig(data=str(path), output_dir=str(tmp_path / "out"), eval_examples=8, merge=True,
                       train=TrainSettings(steps=4, batch_size=4, eval_every=2))
    _, summary = run(config, progress=False)
    log = json.loads((tmp_path / "out" / "log.json").read_text())["log"]
    assert [r["step"] for r in log if "eval_loss" in r and "exact_match" in r] == [2, 4]
    assert summary["before"]["eval_loss"] > 0 and (tmp_path / "out" / "adapter").is_dir()
    # the merged model is a plain transformers checkpoint that scores what the tuned model scored
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "merged")
    held_out = with_held_out(load_instructions(path), 8)["test"]
    after = evaluation(tokenizer, held_out, config.max_length)(merged)
    assert after["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], abs=1e-4)
    assert after["exact_match"] == summary["after"]["exact_match"]


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_merging_folds_adapters_into_a_plain_dense_model(method):
    model, _ = load_model(RunConfig())
    model, _ = add_adapters(model, RunConfig(method=method))
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # an adapter that changes the outputs
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = merge_adapters(model)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    kinds = {type(m).__name__ for m in merged.modules()}
    assert "Linear" in kinds and not kinds & {"NF4Linear", "SVDLinear", "LoRALinear"}
    assert not any(p.requires_grad for p in merged.parameters())


def test_merging_refuses_an_adapter_merged_by_hand_and_changes_nothing():
    model, _ = add_adapters(load_model(RunConfig(quantize=False))[0], RunConfig())
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    layer.merge()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj is merged already: call its unmerge"):
        merge_adapters(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pages_fit_the_adapters():
    adapter = [torch.zeros(6), torch.zeros(6, 128), torch.zeros(128, 6)]  # Λ, Q, P of a tiny model's adapter
    assert fitting_page_bytes(adapter) == 4096, "the smallest page: even 4 KiB pages are mostly padding here"
    big = [torch.zeros(12), torch.zeros(12, 4096), torch.zeros(4096, 12)] * 7  # a 7B layer's adapters
    page = fitting_page_bytes(big)
    states = sum(t.numel() * 4 for t in big)
    rounded = sum(-(-t.numel() * 4 // page) * page for t in big)
    assert rounded <= 1.125 * states < sum(-(-t.numel() * 4 // (2 * page)) * 2 * page for t in big)
    assert fitting_page_bytes([torch.zeros(2**24)]) == 2**20, "at most 1 MiB"


def tiny_model_and_batches(steps, target=("q_proj", "v_proj")):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=50)
    model = transformers.LlamaForCausalLM(config)
    adalora = AdaLoRAConfig(target_modules=list(target), init_r=4, target_r=2, total_steps=steps, lora_alpha=8,
                            t_init=2, t_final=2)
    model, allocator = add_adalora(model, adalora)
    data = [{"input_ids": ids, "attention_mask": [1] * 10, "labels": ids}
            for ids in torch.randint(0, 50, (16, 10)).tolist()]
    return model, allocator, data


def test_loop_runs_the_whole_schedule_with_gradient_accumulation():
    model, allocator, data = tiny_model_and_batches(steps=12)
    batches = endless_batches(data, lambda rows: collate(rows, 0), batch_size=2, seed=0)
    log = train(model, batches, TrainSettings(steps=12, grad_accum=3, gradient_checkpointing=True), allocator,
                progress=False)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[0]["budget"] == 16 and log[-1]["budget"] == allocator.budget == 8
    assert all(r["orth"] >= 0 for r in log)


def test_one_optimizer_step_runs_the_allocator_after_the_update_and_before_zero_grad():
    """optimizer_step, the loop's core: the allocator sees the updated weights and this step's gradients, with the
    optimizer-step count; zero_grad comes last."""
    model, allocator, data = tiny_model_and_batches(steps=12)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW(params, lr=1e-2, page_bytes=fitting_page_bytes(params))
    before = [p.detach().clone() for p in params]
    seen = []
    real_step = allocator.step

    def spying_step(step):
        seen.append((step, all(p.grad is not None for p in params),
                     any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))))
        real_step(step)

    allocator.step = spying_step
    micro_batches = [collate(data[:2], 0), collate(data[2:4], 0)]
    record, scale = optimizer_step(model, micro_batches, optimizer, TrainSettings(steps=12), 1, allocator)
    assert seen == [(1, True, True)], "the allocator runs once, after optimizer.step(), with the gradients"
    assert all(p.grad is None for p in params), "zero_grad comes after the allocator"
    assert scale is None and record["step"] == 1 and record["budget"] == allocator.budget and "orth" in record


def test_loop_refuses_a_miscounted_schedule():
    model, allocator, data = tiny_model_and_batches(steps=12)
    batches = endless_batches(data, lambda rows: collate(rows, 0), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="total_steps=12 but the run has 48 optimizer steps"):
        train(model, batches, TrainSettings(steps=48), allocator, progress=False)


def test_trainer_callback_reaches_the_final_budget(tmp_path):
    model, allocator, data = tiny_model_and_batches(steps=8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=lambda rows: collate(rows, 0),
                                   callbacks=[AdaLoRACallback(model, allocator)])
    trainer.train()
    assert allocator.last_step == 8 and allocator.budget == 8
    assert sum(allocator.ranks.values()) == 8


def test_trainer_callback_refuses_mismatched_steps(tmp_path):
    model, allocator, data = tiny_model_and_batches(steps=8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=lambda rows: collate(rows, 0),
                                   callbacks=[AdaLoRACallback(model, allocator)])
    with pytest.raises(ValueError, match="max_steps=5 but AdaLoRAConfig.total_steps=8"):
        trainer.train()


def test_plan_command_prints_the_7b_plan():
    out = subprocess.run([sys.executable, "-m", "minilora", "plan", "--model", "llama-2-7b", "--max-length", "128"],
                         capture_output=True, text=True, check=True).stdout
    assert "quantized weights (NF4 codes)" in out and "predicted peak" in out and "batch 8 x 128 tokens" in out


def plan_table(text):
    return text[text.index("memory plan:"):]


def test_plan_and_a_dry_run_describe_the_same_run_and_the_dry_run_loads_and_writes_nothing(monkeypatch, capsys,
                                                                                             tmp_path):
    options = ["--model", "llama-2-7b", "--batch-size", "2", "--max-length", "64", "--init-r", "8", "--device", "cpu"]
    assert main(["plan", *options]) == 0
    plan = capsys.readouterr().out
    monkeypatch.setattr("minilora.tune.load_model", refuse_to_load)
    assert main(["tune", *options, "--dry-run", "--output-dir", str(tmp_path / "out")]) == 0
    dry = capsys.readouterr().out
    assert plan_table(dry) == plan_table(plan) and "batch 2 x 64 tokens, adalora rank 8" in plan
    assert "records: 4,000 train, 300 validation, 300 test" in dry and "lr                      0.005" in dry
    assert not (tmp_path / "out").exists()
    settings = RunConfig(model="llama-2-7b", max_length=64, init_r=8, device="cpu",
                         train=TrainSettings(batch_size=2)).memory_settings()
    assert plan_table(plan).endswith(str(plan_memory(resolve_config("llama-2-7b"), settings)) + "\n")


def test_plan_refuses_what_it_cannot_count(capsys, tmp_path):
    transformers.GPT2Config().save_pretrained(tmp_path / "gpt2")
    cases = [(["--model", str(tmp_path / "gpt2")], "this gpt2 config has no intermediate_size"),
             (["--target-modules", "c_attn"], "target_modules=['c_attn']: name some of a Llama layer's projections"),
             (["--batch-size", "-2"], "batch_size=-2"), (["--max-length", "-5"], "max_length=-5"),
             (["--model", "llama2"], "model='llama2': not a directory here, not a hub id 'owner/name'")]
    for argv, message in cases:
        assert main(["plan", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error


def test_help_shows_every_default_and_lists_the_learners_commands_first():
    parser = build_parser()
    for command in ("tune", "plan"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions[1:]:
            shown = sub.formatter_class(prog="x")._get_help_string(action)
            assert action.help and "%(default)" in shown, (command, action.dest)
    listing = parser.format_help()
    assert listing.index("tune") < listing.index("for instructors") < listing.index("for maintainers")


BAD_TUNE_SETTINGS = [
    (["--batch-size", "0"], "batch_size=0"),
    (["--batch-size", "-1"], "batch_size=-1"),
    (["--batch-size", "100000"], "batch_size=100000 but the training split has only 4000 records"),
    (["--steps", "0"], "steps=0"),
    (["--steps", "1"], "steps=1"),  # AdaLoRA's final mask needs one scored step before it
    (["--grad-accum", "0"], "grad_accum=0"),
    (["--eval-examples", "0"], "eval_examples=0"),
    (["--lr", "0"], "lr=0.0"),
    (["--lr", "nan"], "lr=nan"),
    (["--eval-every", "-1"], "eval_every=-1"),
    (["--init-r", "2"], "init_r=2"),
    (["--target-r", "0"], "target_r=0"),
    (["--max-length", "4"], "max_length=4"),
    (["--model", "./no-such-checkpoint"], "model='./no-such-checkpoint'"),
    (["--model", "llama2"], "model='llama2': not a directory here, not a hub id 'owner/name'"),
    (["--data", "./no-such-file.jsonl"], "no such file or directory"),
    (["--data", ""], "data='': leave it unset for the bundled set"),
    (["--model", ""], "model='': pass a checkpoint directory"),
    (["--model", str(BASE_MODEL_DIR / "config.json")], "config.json': pass a checkpoint directory (the one that"),
    (["--seed", "-1"], "seed=-1: use 0 or a positive integer"),
    (["--checkpoint-every", "-1"], "checkpoint_every=-1: use 0 (only on Ctrl-C) or a number of steps"),
    (["--no-quantize", "--compile-dequantize"], "compile_dequantize=True: only an NF4 base is dequantized"),
    (["--device", "banana"], "device='banana': use cpu or cuda"),
    (["--output-dir", ""], "output_dir='': name a directory"),
    (["--output-dir", str(BASE_MODEL_DIR / "config.json" / "run")], "config.json is a file, not a directory"),
]
if not torch.cuda.is_available():
    BAD_TUNE_SETTINGS.append((["--device", "cuda"], "device='cuda': use cpu: torch sees no CUDA GPU here"))


def refuse_to_load(config):
    raise AssertionError("a bad setting must be refused before the model loads")


@pytest.mark.parametrize("argv, named", BAD_TUNE_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
@pytest.mark.usefixtures("time_limit")
def test_tune_refuses_a_bad_setting_in_one_line_before_loading_the_model(argv, named, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("minilora.tune.load_model", refuse_to_load)
    out = [] if "--output-dir" in argv else ["--output-dir", str(tmp_path)]
    assert main(["tune", *argv, *out, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and "\n" not in error, error
    assert not any(tmp_path.iterdir()), "nothing is written for a refused run"


@pytest.mark.usefixtures("time_limit")
def test_a_training_split_smaller_than_the_batch_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    # The last round's hang: 405 records, 400 held out for validation and test, 5 left for a batch of 8.
    records = load_instructions(split="train").select(range(12))
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr("minilora.tune.load_model", refuse_to_load)
    assert main(["tune", "--data", str(path), "--eval-examples", "4", "--output-dir", str(tmp_path / "out")]) == 2
    assert "batch_size=8 but the training split has only 4 records" in capsys.readouterr().err


@pytest.mark.parametrize("size, batch_size", [(5, 8), (0, 1), (5, 0)])
@pytest.mark.usefixtures("time_limit")
def test_endless_batches_refuse_what_would_never_yield_a_batch(size, batch_size):
    with pytest.raises(ValueError, match=f"batch_size={batch_size} but the training split has {size} records"):
        next(endless_batches(list(range(size)), list, batch_size, seed=0))


def test_the_loop_refuses_settings_that_cannot_train():
    model, allocator, data = tiny_model_and_batches(steps=12)
    batches = endless_batches(data, lambda rows: collate(rows, 0), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="grad_accum=0: use at least 1 micro-batch"):
        train(model, batches, TrainSettings(steps=12, grad_accum=0), allocator, progress=False)


def test_the_shortest_adalora_run_completes(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), eval_examples=2, train=TrainSettings(steps=2, batch_size=2))
    _, summary = run(config, progress=False)
    assert summary["final_budget"] == 4 * 28


def test_an_earlier_run_is_kept_unless_overwrite_and_an_interrupted_run_leaves_it_whole(monkeypatch, tmp_path):
    small = dict(output_dir=str(tmp_path / "out"), eval_examples=2, method="lora",
                 train=TrainSettings(steps=1, batch_size=2))
    run(RunConfig(**small), progress=False)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"run.json", "log.json", "adapter_config.json", "adapter_model.safetensors"} <= set(first)
    with pytest.raises(ValueError, match="holds an earlier run \\(run.json, log.json, adapter\\): choose another"):
        run(RunConfig(**small), progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the results are written

    monkeypatch.setattr("minilora.tune.write_run_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig(**small, overwrite=True), progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == first
    assert not list((tmp_path / "out").glob(".partial-*")), "no staging directory is left"
    monkeypatch.undo()
    run(RunConfig(**small, overwrite=True, merge=True), progress=False)
    assert (tmp_path / "out" / "merged").is_dir()
    run(RunConfig(**small, overwrite=True), progress=False)
    assert not (tmp_path / "out" / "merged").exists(), "an overwritten run leaves none of the earlier results"


def test_a_lora_run_saves_an_adapter_peft_loads_with_the_same_outputs(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), eval_examples=2, method="lora", quantize=False,
                       train=TrainSettings(steps=3, batch_size=2, lr=0.05))
    tuned, _ = run(config, progress=False)
    base, _ = load_model(config)
    ids = torch.tensor([[1, 8, 9, 10, 11]])
    with torch.no_grad():
        tuned_logits, base_logits = tuned(input_ids=ids).logits, base(input_ids=ids).logits
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-4), "training changed the model"
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")  # puts the adapters into base
        torch.testing.assert_close(loaded(input_ids=ids).logits, tuned_logits, atol=1e-5, rtol=1e-5)


def test_long_records_are_left_out_counted_and_reported_and_chat_data_trains(tmp_path, capsys):
    records = load_instructions(split="train").select(range(40))
    chat = [{"messages": [{"role": "user", "content": r["instruction"] + " " + r["input"]},
                          {"role": "assistant", "content": r["output"]}]} for r in records]
    chat[3]["messages"][0]["content"] += " please" * 200  # a prompt longer than max_length: it used to divide by 0
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat))
    config = RunConfig(data=str(path), output_dir=str(tmp_path / "out"), eval_examples=4,
                       train=TrainSettings(steps=2, batch_size=4))
    _, summary = run(config, progress=False)
    left_out = json.loads((tmp_path / "out" / "run.json").read_text())["left_out_longer_than_max_length"]
    assert sum(left_out.values()) == 1 and math.isfinite(summary["after"]["eval_loss"])
    split = next(name for name, count in left_out.items() if count)
    assert f"max_length=96: left out 1 of {32 if split == 'train' else 4} {split} records" in capsys.readouterr().out


def test_the_7b_command_runs_end_to_end_on_a_pad_less_llama_checkpoint_and_alpaca_data(tmp_path, capsys):
    checkpoint = tmp_path / "llama-like"  # saved here like a Llama-2 download: no pad token in its tokenizer
    model, tokenizer = load_model(RunConfig(quantize=False))
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del settings["pad_token"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
    assert transformers.AutoTokenizer.from_pretrained(checkpoint).pad_token is None
    alpaca = tmp_path / "alpaca.jsonl"
    records = load_instructions(split="train").select(range(48))
    alpaca.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n"
                              for r in records))
    out = tmp_path / "out"
    assert main(["tune", "--recipe", "qlora-7b", "--model", str(checkpoint), "--data", str(alpaca), "--steps", "3",
                 "--grad-accum", "2", "--eval-examples", "4", "--output-dir", str(out), "--no-progress"]) == 0, \
        capsys.readouterr().err
    resolved = json.loads((out / "run.json").read_text())["settings"]
    assert (resolved["init_r"], resolved["target_r"], resolved["max_length"], resolved["compute_dtype"]) == \
        (12, 8, 512, "float32")
    train = resolved["train"]
    assert (train["steps"], train["grad_accum"], train["lr"], train["max_grad_norm"]) == (3, 2, 2e-4, 0.3)
    assert train["gradient_checkpointing"] and train["resident_bytes"] == 64 * 2**20
    adapter = read_adapter_meta(out / "adapter")
    assert adapter["base_model"] == str(checkpoint.resolve())
    assert transformers.AutoConfig.from_pretrained(checkpoint).vocab_size == len(tokenizer), "no token was added"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_trains_float32_adapters_and_float16_scales_its_loss(dtype, tmp_path):
    config = RunConfig(output_dir=str(tmp_path), eval_examples=4, compute_dtype=dtype,
                       train=TrainSettings(steps=4, batch_size=4))
    model, summary = run(config, progress=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype")} == {getattr(torch, dtype)}
    assert math.isfinite(summary["after"]["eval_loss"]) and summary["final_budget"] == 4 * 28
    resolved = json.loads((tmp_path / "run.json").read_text())["settings"]["train"]
    assert resolved["loss_scale"] == (2.0**16 if dtype == "float16" else None)


def test_a_float16_overflow_repeats_the_step_at_half_the_scale(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), eval_examples=4, compute_dtype="float16",
                       train=TrainSettings(steps=6, batch_size=4, loss_scale=2.0**24))
    _, summary = run(config, progress=False)
    log = json.loads((tmp_path / "log.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6], "every step is taken, none is skipped"
    scale = log[0]["loss_scale"]  # halved until float16 held the scaled gradients
    assert scale < 2.0**24 and math.log2(scale).is_integer()
    assert summary["final_budget"] == 4 * 28 and all(math.isfinite(r["grad_norm"]) for r in log)
    scales = [r["loss_scale"] for r in log]
    assert scales == sorted(scales, reverse=True) and all(math.log2(s).is_integer() for s in scales), \
        "the scale only ever halves"


def test_a_step_that_overflows_at_every_scale_ends_in_one_clear_error_not_a_loop(monkeypatch):
    model, allocator, data = tiny_model_and_batches(steps=6)
    tries = []
    monkeypatch.setattr("minilora.tune.unscaled", lambda params, scale: tries.append(scale) and False)
    with pytest.raises(FloatingPointError, match="step 1 overflows float16 even unscaled: compute in bfloat16"):
        train(model, endless_batches(data, lambda rows: collate(rows, 0), 2, seed=0),
              TrainSettings(steps=6, loss_scale=8.0), allocator, progress=False)
    assert tries == [8.0, 4.0, 2.0, 1.0]


def test_warm_up_raises_the_learning_rate_linearly_then_holds_it(monkeypatch):
    model, allocator, data = tiny_model_and_batches(steps=10)
    seen = []
    original = PagedAdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PagedAdamW, "step", record)
    batches = endless_batches(data, lambda rows: collate(rows, 0), batch_size=2, seed=0)
    train(model, batches, TrainSettings(steps=10, lr=1.0, warmup_ratio=0.3), allocator, progress=False)
    assert seen == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)


def test_a_recipe_gives_defaults_that_given_options_override(capsys, tmp_path):
    assert recipe("qlora-7b").train.lr == 2e-4 and RunConfig().train.lr == 5e-3
    with pytest.raises(ValueError, match="recipe='qlora-70b': use one of \\['qlora-7b'\\]"):
        recipe("qlora-70b")
    assert main(["plan", "--recipe", "qlora-7b", "--model", "llama-2-7b", "--init-r", "16"]) == 0
    assert "batch 1 x 512 tokens, adalora rank 16" in capsys.readouterr().out


def test_the_plan_of_a_gpu_run_counts_the_base_in_its_compute_dtype_and_the_page_pool_on_the_host():
    cpu, gpu = (plan_memory(resolve_config("llama-2-7b"), RunConfig(device=device).memory_settings())
                for device in ("cpu", "cuda"))
    assert gpu.bytes_of("embeddings, head and norms") * 2 == cpu.bytes_of("embeddings, head and norms")
    assert gpu.peak < cpu.peak - cpu.bytes_of("optimizer page pool")
    lora = plan_memory(resolve_config("llama-2-7b"), RunConfig(method="lora").memory_settings())
    assert lora.bytes_of("importance scores") == 0 and cpu.bytes_of("importance scores") > 0
    half = RunConfig(device="cuda", compute_dtype="float16").memory_settings()
    assert half.compute_bytes == 2 and RunConfig(device="cpu", compute_dtype="bfloat16").memory_settings().base_bytes \
        == 2


def test_a_gated_model_and_an_exhausted_gpu_say_what_to_do(monkeypatch, capsys, tmp_path):
    import httpx
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise GatedRepoError("403", response=httpx.Response(403, request=httpx.Request("GET", "https://hf.co")))

    monkeypatch.setattr("huggingface_hub.snapshot_download", gated)
    assert main(["plan", "--model", "meta-llama/Llama-2-7b-hf"]) == 2
    assert "is gated: accept its license on huggingface.co/meta-llama/Llama-2-7b-hf, then log in with " \
           "`huggingface-cli login` or set HF_TOKEN" in capsys.readouterr().err

    def out_of_memory(config, progress):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("minilora.tune.run", out_of_memory)
    assert main(["tune", "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower --batch-size" in error
    assert "\n" not in error


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_runs(monkeypatch, tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="gone is a broken link, not a directory"):
        RunConfig(output_dir=str(tmp_path / "gone" / "out")).check()
    monkeypatch.setattr("minilora.outputs.os.access", lambda path, mode: False)  # as a user without the right
    with pytest.raises(ValueError, match=f"output_dir='{tmp_path}/new/out': {tmp_path} is not writable here"):
        RunConfig(output_dir=str(tmp_path / "new" / "out")).check()


def test_ctrl_c_and_a_diverging_loss_end_in_one_line(monkeypatch, capsys, tmp_path):
    for raised, code, message in [(KeyboardInterrupt(), 130, "interrupted; results appear only when complete"),
                                  (FloatingPointError("the loss became nan at step 3"), 2, "the loss became nan")]:
        def stop(config, progress, raised=raised):
            raise raised

        monkeypatch.setattr("minilora.tune.run", stop)
        assert main(["tune", "--output-dir", str(tmp_path / "out")]) == code
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error


def test_a_stale_staging_directory_is_cleared_by_the_next_run(tmp_path):
    stale = tmp_path / "out" / ".partial-killed"
    stale.mkdir(parents=True)
    (stale / "log.json").write_text("{half")
    run(RunConfig(output_dir=str(tmp_path / "out"), eval_examples=2, method="lora",
                  train=TrainSettings(steps=1, batch_size=2)), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", "log.json", "run.json"]
