"""minilora.data and the bundled data/: the generator reproduces the committed files, the loaders, tokenization
with the prompt masked, padding, the bundled tiny Llama, and that it cannot do the tasks before fine-tuning."""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from minilora.data import (
    BASE_MODEL_DIR,
    DATA_DIR,
    HEADERS,
    IGNORE_INDEX,
    INSTRUCTIONS_DIR,
    collate,
    exact_match,
    fit_to_length,
    format_prompt,
    generate_responses,
    load_base_model,
    load_instructions,
    load_tokenizer,
    tokenize_record,
    with_held_out,
)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, DATA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_dataset():
    return load_script("make_dataset")


@pytest.fixture(scope="module")
def committed():
    return {split: [json.loads(line) for line in (INSTRUCTIONS_DIR / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base_model()


def test_the_script_regenerates_the_committed_files_exactly(make_dataset, committed):
    assert make_dataset.build_splits() == committed
    assert {split: len(records) for split, records in committed.items()} == make_dataset.SPLIT_SIZES


def test_splits_are_disjoint_and_every_task_is_held_out(make_dataset, committed):
    keys = {split: {(r["task"], r["input"]) for r in records} for split, records in committed.items()}
    assert all(len(keys[split]) == len(committed[split]) for split in committed)  # no repeats within a split
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    tasks = set(make_dataset.INSTRUCTIONS)
    assert all({r["task"] for r in records} == tasks for records in committed.values())


def test_every_answer_is_right(make_dataset, committed):
    days, months = make_dataset.DAYS, make_dataset.MONTHS
    words = [word for pair in make_dataset.OPPOSITES for word in pair]
    assert len(set(words)) == len(words)  # each word has one opposite, so exact match is fair
    opposites = dict(make_dataset.OPPOSITES) | {b: a for a, b in make_dataset.OPPOSITES}
    rules = {
        "add": lambda x: str(int(x.split(" + ")[0]) + int(x.split(" + ")[1])),
        "subtract": lambda x: str(int(x.split(" - ")[0]) - int(x.split(" - ")[1])),
        "reverse": lambda x: x[::-1], "uppercase": str.upper, "length": lambda x: str(len(x)),
        "sort": lambda x: "".join(sorted(x)),
        "next_day": lambda x: days[(days.index(x) + 1) % 7], "previous_day": lambda x: days[days.index(x) - 1],
        "next_month": lambda x: months[(months.index(x) + 1) % 12],
        "previous_month": lambda x: months[months.index(x) - 1], "opposite": opposites.get,
    }
    for records in committed.values():
        for r in records:
            assert r["output"] == rules[r["task"]](r["input"]), r
            assert r["instruction"] in make_dataset.INSTRUCTIONS[r["task"]]


def test_pretraining_text_is_plain_and_reproducible(make_dataset):
    docs = make_dataset.pretraining_documents(300)
    assert docs == make_dataset.pretraining_documents(300)
    instructions = [i for wordings in make_dataset.INSTRUCTIONS.values() for i in wordings]
    assert not any(h in doc or i in doc for doc in docs for h in ("###", *HEADERS) for i in instructions)


def test_the_bundled_set_loads_offline():
    code = ("from minilora.data import load_instructions; d = load_instructions(); "
            "print({s: len(d[s]) for s in d}, load_instructions(split='test')[0]['output'])")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    test_first = json.loads((INSTRUCTIONS_DIR / "test.jsonl").read_text().splitlines()[0])["output"]
    assert out.stdout.strip() == f"{{'train': 4000, 'validation': 300, 'test': 300}} {test_first}"


def test_a_jsonl_file_loads_as_train_and_gets_an_empty_input(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say yo.", "output": "yo"}\n')
    data = load_instructions(path)
    assert list(data) == ["train"]
    records = load_instructions(str(path), split="train")
    assert records["input"] == ["", ""] and records["output"] == ["hi", "yo"]


def test_a_train_only_source_gets_seeded_disjoint_held_out_splits(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(20)))
    data = with_held_out(load_instructions(path), size=3, seed=0)
    outputs = {split: list(data[split]["output"]) for split in ("train", "validation", "test")}
    assert [len(o) for o in outputs.values()] == [14, 3, 3]
    assert sorted(sum(outputs.values(), []), key=int) == [str(i) for i in range(20)], "disjoint, nothing lost"
    assert list(with_held_out(load_instructions(path), size=3, seed=0)["test"]["output"]) == outputs["test"]
    assert list(with_held_out(load_instructions(path), size=3, seed=1)["test"]["output"]) != outputs["test"]
    bundled = load_instructions()
    assert with_held_out(bundled, size=3) is bundled, "a source with its own splits keeps them"
    with pytest.raises(ValueError, match="no validation or test split and only 20 training records: holding out 10"):
        with_held_out(load_instructions(path), size=10)


def test_bad_sources_and_splits_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*nothing.jsonl"):
        load_instructions(tmp_path / "nothing.jsonl")
    with pytest.raises(FileNotFoundError, match="must hold a train file \\(.jsonl, .json or .csv\\) and may hold"):
        load_instructions(tmp_path)
    with pytest.raises(ValueError, match="split 'dev' is not in .* its splits are \\['train', 'validation', 'test'\\]"):
        load_instructions(split="dev")
    with pytest.raises(FileNotFoundError, match="no model \\(config.json\\) in .*pretrain_base.py"):
        load_base_model(tmp_path)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'top'"):
        collate([{"input_ids": [1]}], 0, padding_side="top")


def test_prompt_template_with_and_without_input():
    prompt, full = format_prompt({"instruction": "Reverse the word.", "input": "kamo", "output": "omak"})
    assert prompt == "### Instruction:\nReverse the word.\n### Input:\nkamo\n### Response:\n"
    assert full == prompt + "omak"
    prompt, _ = format_prompt({"instruction": "Name a day.", "input": "", "output": "monday"})
    assert prompt == "### Instruction:\nName a day.\n### Response:\n"


def test_tokenizer_round_trips_and_keeps_headers_whole(base, committed):
    _, tokenizer = base
    assert len(tokenizer) < 1000
    for record in committed["validation"]:
        _, full = format_prompt(record)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == full
    assert all(len(tokenizer(h, add_special_tokens=False)["input_ids"]) == 1 for h in HEADERS)
    assert tokenizer("abc")["input_ids"][0] == tokenizer.bos_token_id  # Llama-style: <s> first


def test_labels_cover_only_the_response_and_eos(base, committed):
    _, tokenizer = base
    for record in committed["test"][:50]:
        row = tokenize_record(record, tokenizer)
        prompt, _ = format_prompt(record)
        n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert tokenizer.decode(row["labels"][n_prompt:-1]) == record["output"]
    with pytest.raises(ValueError, match="max_length=5 but the record has .* tokens .*raise max_length, or leave"):
        tokenize_record(committed["test"][0], tokenizer, max_length=5)  # cutting would drop the answer's end


def test_records_longer_than_max_length_are_left_out_and_counted_never_cut(base, committed):
    _, tokenizer = base
    records = load_instructions(split="test").select(range(40))
    lengths = [len(tokenize_record(r, tokenizer)["input_ids"]) for r in records]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, features, left_out, longest = fit_to_length(records, tokenizer, limit)
    assert left_out == sum(n > limit for n in lengths) > 0 and longest == max(lengths)
    assert len(kept) == len(features) == 40 - left_out
    assert all(f["input_ids"][-1] == tokenizer.eos_token_id and len(f["input_ids"]) <= limit for f in features)
    assert list(kept["output"]) == [r["output"] for r, n in zip(records, lengths, strict=True) if n <= limit]
    with pytest.raises(ValueError, match=f"every one of the 40 records is longer \\(the shortest has {min(lengths)}"):
        fit_to_length(records, tokenizer, min(lengths) - 1)


def test_collate_pads_right_for_training_and_left_for_generation(base, committed):
    _, tokenizer = base
    rows = [tokenize_record(r, tokenizer) for r in committed["train"][:4]]
    lengths = [len(r["input_ids"]) for r in rows]
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all() and batch["input_ids"][i, n:].eq(0).all()
    left = collate(rows, tokenizer.pad_token_id, padding_side="left")
    assert [row[-n:].tolist() for row, n in zip(left["input_ids"], lengths, strict=True)] == \
        [r["input_ids"] for r in rows]


def test_the_bundled_model_is_a_small_llama_that_knows_its_world(base):
    model, tokenizer = base
    assert isinstance(model, transformers.LlamaForCausalLM) and next(model.parameters()).dtype == torch.float32
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in BASE_MODEL_DIR.iterdir()) < 20 * 2**20
    docs = load_script("make_dataset").pretraining_documents(32, seed=99)
    rows = [[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
            for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    batch = collate([{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        torch.manual_seed(0)
        untrained = transformers.LlamaForCausalLM(model.config).eval()(**batch).loss
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert out.loss < 0.4 * untrained  # pretraining taught it the plain-text facts


def test_greedy_responses_do_not_depend_on_batching_and_exact_match_counts(base, committed):
    model, tokenizer = base
    records = committed["validation"][:6]  # prompts of different lengths: left padding must not change answers
    together = generate_responses(model, tokenizer, records, max_new_tokens=6, batch_size=6)
    assert together == generate_responses(model, tokenizer, records, max_new_tokens=6, batch_size=1)
    echoed = [dict(r, output=f" {text} ") for r, text in zip(records, together, strict=True)]
    assert exact_match(model, tokenizer, echoed, max_new_tokens=6) == 1.0  # compared after stripping spaces
    echoed[0]["output"] = "#never generated#"
    assert exact_match(model, tokenizer, echoed, max_new_tokens=6) == 5 / 6


def test_the_base_model_cannot_follow_instructions_yet(base):
    model, tokenizer = base
    test = load_instructions(split="test").select(range(100))  # data/pretrain_base.py reports all 300
    assert exact_match(model, tokenizer, test, max_new_tokens=10, batch_size=len(test)) < 0.1


GOOD = '{"instruction": "Say hi.", "output": "hi"}'
BAD_FILES = [
    ("empty.jsonl", "\n\n", r"empty.jsonl holds no records; a record looks like"),
    ("empty.csv", "instruction,output\n", r"empty.csv holds no records"),
    ("cut.jsonl", GOOD + "\n" + '{"instruction": "Say yo.", "output": "y' + "\n", r"cut.jsonl, line 2: not valid JSON"),
    ("fields.jsonl", GOOD + "\n\n" + '{"question": "Say hi.", "output": "hi"}\n',
     r"fields.jsonl, line 3: the record lacks \['instruction'\] \(its fields: \['output', 'question'\]\); rename"),
    ("half.jsonl", '{"prompt": "Say hi.", "output": "hi"}\n', r"half.jsonl, line 1: the record lacks \['completion'\]"),
    ("mixed.jsonl", GOOD + "\n" + '{"prompt": "2 + 3 =", "completion": " 5"}\n',
     r"mixed.jsonl, line 2 is a prompt/completion record but .*mixed.jsonl, line 1 is an instruction record: use one"),
    ("chat.jsonl", '{"messages": [{"role": "user", "content": "Hi"}]}\n',
     r"chat.jsonl, line 1: a chat record ends with the answer to learn, a message with role 'assistant'"),
    ("role.jsonl", '{"messages": [{"role": "user", "text": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n',
     r"role.jsonl, line 1: message 0 must be an object with string 'role' and 'content'"),
    ("table.csv", "instruction,answer\nSay hi.,hi\n", r"table.csv, line 2: the record lacks \['output'\]"),
    ("table.tsv", "instruction\toutput\nSay hi.\thi\n", r"table.tsv: data must be a .jsonl file"),
    ("extra.csv", "instruction,output\nSay hi.,hi,there\n", r"extra.csv, line 2: more values than the header has"),
    ("silent.jsonl", '{"instruction": "Say nothing.", "output": " "}\n',
     r"silent.jsonl, line 1: the answer is empty, so there is nothing to learn"),
    ("huge.jsonl", '{"instruction": "Repeat.", "output": "' + "ab" * 600_000 + '"}\n',
     r"huge.jsonl, line 1: a record of 1,200,0\d\d characters, more than any max_length holds"),
    ("number.jsonl", '{"instruction": "Count.", "output": 5}\n',
     r"number.jsonl, line 1: 'output' must be a string, found 5"),
    ("list.jsonl", "[1, 2]\n", r"list.jsonl, line 1: a record must be a JSON object"),
    ("one.json", GOOD, r"one.json: a .json file must hold a list of records, found a dict"),
    ("many.json", "[" + GOOD + ", 3]", r"many.json, record 1: a record must be a JSON object"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_a_bad_data_file_is_refused_with_its_name_line_and_fix(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_instructions(path)


def test_a_json_list_loads_and_a_directory_with_unknown_split_files_is_refused(tmp_path):
    (tmp_path / "list.json").write_text("[" + GOOD + ", " + GOOD + "]")
    assert load_instructions(tmp_path / "list.json", split="train")["output"] == ["hi", "hi"]
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text(GOOD + "\n")
    (folder / "valid.csv").write_text("instruction,output\nSay yo.,yo\n")
    assert {name: list(part["output"]) for name, part in load_instructions(folder).items()} == {
        "train": ["hi"], "validation": ["yo"]}
    (folder / "eval.jsonl").write_text(GOOD + "\n")
    with pytest.raises(ValueError, match="holds two validation files, eval.jsonl and valid.csv: keep one"):
        load_instructions(folder)
    (folder / "eval.jsonl").rename(folder / "notes.jsonl")
    with pytest.raises(FileNotFoundError, match="rename notes.jsonl"):
        load_instructions(folder)


def test_prompt_completion_and_chat_records_are_read_and_formatted(tmp_path, base):
    _, tokenizer = base
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "2 + 3 =", "completion": " 5", "source": "ignored"}\n')
    record = load_instructions(path, split="train")[0]
    assert record == {"prompt": "2 + 3 =", "output": " 5"} and format_prompt(record) == ("2 + 3 =", "2 + 3 = 5")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Reverse kamo."},
                                              {"role": "assistant", "content": "omak"}]}]))
    record = load_instructions(path, split="train")[0]
    assert record["output"] == "omak" and [m["role"] for m in record["messages"]] == ["system", "user"]
    assert format_prompt(record)[0] == "### System:\nBe brief.\n### User:\nReverse kamo.\n### Assistant:\n"
    chat = copy.deepcopy(tokenizer)  # a tokenizer with a chat template renders the conversation its own way
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt, full = format_prompt(record, chat)
    assert prompt == "<system>Be brief.<user>Reverse kamo.<assistant>" and full == prompt + "omak"
    row = tokenize_record(record, chat)
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1, "the template's bos text is not doubled"
    assert tokenizer.decode(row["input_ids"][-1 - len(tokenizer("omak", add_special_tokens=False)["input_ids"]):-1]) \
        == "omak" and row["labels"][-1] == tokenizer.eos_token_id


def test_a_tokenizer_without_padding_pads_with_eos_and_a_model_without_tokenizer_is_named(tmp_path):
    llama2_like = tmp_path / "llama2-like"
    shutil.copytree(BASE_MODEL_DIR, llama2_like)
    settings = json.loads((llama2_like / "tokenizer_config.json").read_text())
    del settings["pad_token"]
    (llama2_like / "tokenizer_config.json").write_text(json.dumps(settings))
    assert transformers.AutoTokenizer.from_pretrained(llama2_like).pad_token is None, "Llama-2's tokenizer has none"
    tokenizer = load_tokenizer(llama2_like)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1] * 3}, {"input_ids": [5], "attention_mask": [1]}]
    assert collate(rows, tokenizer.pad_token_id)["input_ids"][1].tolist() == [5] + [tokenizer.eos_token_id] * 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama2_like / name).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*llama2-like \\(none of tokenizer.json, .*save one"):
        load_tokenizer(llama2_like)


def test_a_hub_data_set_is_downloaded_then_checked_like_a_local_one(tmp_path, monkeypatch):
    hub_copy = tmp_path / "hub"
    hub_copy.mkdir()
    (hub_copy / "train.jsonl").write_text('{"prompt": "2 + 3 =", "completion": " 5"}\n{"prompt": "1 + 1 ="}\n')
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, repo_type, allow_patterns: hub_copy)
    with pytest.raises(ValueError, match="someone/sums, split train, record 1: the record lacks \\['completion'\\]"):
        load_instructions("someone/sums")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ValueError, match="cannot download 'someone/sums' from the hub \\(ConnectionError\\). Offline"):
        load_instructions("someone/sums")
    with pytest.raises(FileNotFoundError, match="data='sums': not a file or directory here, and not a hub data set"):
        load_instructions("sums")


def test_a_byte_order_mark_and_an_upper_case_suffix_are_read_like_any_file(tmp_path):
    (tmp_path / "excel.csv").write_text("instruction,output\nSay hi.,hi\n", encoding="utf-8-sig")
    (tmp_path / "notepad.JSONL").write_text(GOOD + "\n", encoding="utf-8-sig")
    for name in ("excel.csv", "notepad.JSONL"):
        assert load_instructions(tmp_path / name, split="train")[0] == {"instruction": "Say hi.", "input": "",
                                                                         "output": "hi"}


def test_a_chat_template_that_refuses_a_role_is_named_in_one_line(base):
    _, tokenizer = base
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}"
                            "{% endfor %}")
    record = {"messages": [{"role": "tool", "content": "42"}], "output": "ok"}
    with pytest.raises(ValueError, match="the tokenizer's chat template refuses a conversation with the roles "
                                         "\\['tool'\\] \\(unknown role tool\\): use the roles it knows"):
        tokenize_record(record, strict)
