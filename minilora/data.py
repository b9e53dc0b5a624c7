"""Instruction data for fine-tuning a causal language model: the prompt template, loading, tokenizing, exact match.

A record is {"instruction", "input" (may be empty), "output"}. The model reads the Alpaca-style prompt

    ### Instruction:
    Reverse the word.
    ### Input:
    kamo
    ### Response:

and learns to continue it with the output and the end-of-sequence token. The loss is computed on the response
tokens only (labels = -100 on the prompt and on padding), as in instruction tuning (Alpaca; QLoRA, Dettmers et al.
2023, arXiv 2305.14314, section 5, trains on the target only).

The bundled data set and the tiny base model live in data/ and are made by data/make_dataset.py and
data/pretrain_base.py (see data/README.md).
"""

import json
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
INSTRUCTIONS_DIR = DATA_DIR / "instructions"
BASE_MODEL_DIR = DATA_DIR / "tiny-llama"
SPLITS = ("train", "validation", "test")
HEADERS = ("### Instruction:", "### Input:", "### Response:")
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips
EXAMPLE_RECORD = '{"instruction": "Reverse the word.", "input": "kamo", "output": "omak"}'


def format_prompt(record):
    """Return (prompt, full text): the prompt the model reads, and the prompt followed by the reference output.

    The Input section is left out when the record's input is empty. The end-of-sequence token is not text: it is
    appended as a token id by `tokenize_record`.
    """
    instruction, given = HEADERS[0], record.get("input") or ""
    prompt = f"{instruction}\n{record['instruction']}\n"
    if given:
        prompt += f"{HEADERS[1]}\n{given}\n"
    prompt += f"{HEADERS[2]}\n"
    return prompt, prompt + record["output"]


def looks_like_a_path(source):
    text = str(source)
    return (Path(text).suffix in (".json", ".jsonl") or text.startswith((".", "/", "~"))
            or text.count("/") > 1 or "\\" in text)


def read_records(path):
    """The instruction records of one local file, each checked, as a datasets.Dataset. A .jsonl file holds one JSON
    object per line (blank lines are skipped), a .json file one JSON list of objects. An error names the file and
    the line (or, in a .json list, the record's index), what is wrong, and what a record must look like."""
    from datasets import Dataset

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); a .json file holds one list "
                             f"of records (use .jsonl for one record per line)") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json file must hold a list of records, found a {type(rows).__name__}")
        located = [(f"{path}, record {i}", row) for i, row in enumerate(rows)]
    elif path.suffix == ".jsonl":
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"{path}, line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one "
                                     f"record such as {EXAMPLE_RECORD}") from None
    else:
        raise ValueError(f"{path}: instruction data must be a .jsonl file (one record per line) or a .json list of "
                         f"records, such as {EXAMPLE_RECORD}; convert other formats first")
    if not located:
        raise ValueError(f"{path} holds no records: write one per line, such as {EXAMPLE_RECORD}")
    return Dataset.from_list([checked_record(row, where) for where, row in located])


def checked_record(row, where):
    """One record as {"instruction", "input", "output"} strings, or an error that says where and what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record must be a JSON object such as {EXAMPLE_RECORD}, found {row!r:.60}")
    missing = [key for key in ("instruction", "output") if key not in row]
    if missing:
        raise ValueError(f"{where}: the record lacks {missing} (its fields: {sorted(row)}); each record needs "
                         "'instruction' and 'output' and may have 'input': rename the fields")
    record = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    for key, value in record.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, found {value!r:.60}: write it in quotes")
    return record


def _check_fields(data, source):
    for split, part in data.items():
        missing = [field for field in ("instruction", "output") if field not in part.column_names]
        if missing:
            raise ValueError(f"the records of split {split!r} in {source} lack the field(s) {missing}; found "
                             f"{part.column_names}. Each record needs 'instruction' and 'output' (and may have "
                             f"'input'): rename the columns, e.g. with Dataset.rename_column")
        if "input" not in part.column_names:
            data[split] = part.add_column("input", [""] * len(part))
    return data


def _quiet_load(*args, **kwargs):
    # progress bars appear only on the first, uncached load: they would make notebook outputs irreproducible
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_instructions(source=None, split=None):
    """Load instruction records as a datasets.DatasetDict, or one split of it as a Dataset when `split` is given.

    source: None for the bundled data set (data/instructions/, splits train/validation/test); a directory holding
    train/validation/test .jsonl files; one .json/.jsonl file (loaded as split "train"); or a Hugging Face hub id
    such as "tatsu-lab/alpaca" (needs internet the first time).
    """
    from datasets import DatasetDict

    source = INSTRUCTIONS_DIR if source is None else source
    path = Path(source).expanduser()
    if path.is_dir():
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
        others = sorted(p.name for p in path.glob("*.json*") if p.stem not in SPLITS)
        if not files or others:
            raise FileNotFoundError(f"the directory {path} must hold train.jsonl, and may hold validation.jsonl and "
                                    f"test.jsonl{'; rename ' + ', '.join(others) if others else ''} (or pass one "
                                    ".jsonl file: its validation and test records are then held out from it)")
        data = DatasetDict({split: read_records(file) for split, file in files.items()})
    elif path.is_file():
        data = DatasetDict({"train": read_records(path)})
    elif looks_like_a_path(source):
        raise FileNotFoundError(f"no such file or directory: {path}. Pass an existing .jsonl file or directory, "
                                f"None for the bundled data set, or a hub id such as 'tatsu-lab/alpaca'")
    else:
        data = _check_fields(_quiet_load(str(source)), source)
    if split is None:
        return data
    if split not in data:
        raise ValueError(f"split {split!r} is not in {source}; its splits are {list(data)}")
    return data[split]


def load_base_model(path=BASE_MODEL_DIR, dtype=torch.float32):
    """Load a causal LM and its tokenizer from a local directory (the bundled tiny Llama by default) or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if looks_like_a_path(path) and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"no model (config.json) in {path}; for the bundled tiny model run "
                                f"`python data/pretrain_base.py` from the repository root")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(path))


def with_held_out(data, size, seed=0):
    """`data` (a DatasetDict) with validation and test splits: its own, or for each one it lacks, `size` records
    taken from a seeded shuffle of train and removed from train (one .jsonl file or most hub sets have only train)."""
    from datasets import DatasetDict

    missing = [name for name in ("validation", "test") if name not in data]
    if not missing:
        return data
    train = data["train"]
    if len(train) <= size * len(missing):
        raise ValueError(f"the data has no {' or '.join(missing)} split and only {len(train)} training records: "
                         f"holding out {size} for each would leave nothing to train on. Ask for fewer evaluation "
                         f"examples, or pass a directory with validation.jsonl and test.jsonl")
    shuffled = train.shuffle(seed=seed)
    out = DatasetDict(data)
    for i, name in enumerate(missing):
        out[name] = shuffled.select(range(i * size, (i + 1) * size))
    out["train"] = shuffled.select(range(len(missing) * size, len(shuffled)))
    return out


def _ids_with_bos(text, tokenizer):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id] + ids


def tokenize_record(record, tokenizer, max_length=None):
    """Token ids for causal-LM fine-tuning: [bos] prompt response [eos], with labels only on response and eos.

    The full text is tokenized in one piece (so subword merges at the prompt/response border match what the
    model sees), and the first len(prompt tokens) positions are masked with IGNORE_INDEX.
    """
    prompt, full = format_prompt(record)
    n_prompt = len(_ids_with_bos(prompt, tokenizer))
    ids = _ids_with_bos(full, tokenizer) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate(features, pad_token_id, padding_side="right"):
    """Pad a list of tokenized records to the longest one: a dict of LongTensors [batch, longest].

    Padding gets attention_mask 0 and label IGNORE_INDEX. Use padding_side="left" for generation, so that every
    prompt ends at the last position.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(f["input_ids"]) for f in features)
    pad_with = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, fill in pad_with.items():
        if key in features[0]:
            rows = [(f[key], [fill] * (width - len(f[key]))) for f in features]
            batch[key] = torch.tensor([pad + row if padding_side == "left" else row + pad for row, pad in rows])
    return batch


@torch.no_grad()
def generate_responses(model, tokenizer, records, max_new_tokens=16, batch_size=64):
    """Greedy-decode a response for each record's prompt; return the decoded texts (special tokens removed)."""
    was_training = model.training
    model.eval()
    responses = []
    for start in range(0, len(records), batch_size):
        chunk = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        prompts = [_ids_with_bos(format_prompt(r)[0], tokenizer) for r in chunk]
        batch = collate([{"input_ids": p, "attention_mask": [1] * len(p)} for p in prompts],
                        tokenizer.pad_token_id, padding_side="left")
        device = next(model.parameters()).device
        out = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        responses += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return responses


def exact_match(model, tokenizer, dataset, max_new_tokens=16, batch_size=64):
    """Fraction of records whose greedy response, stripped of surrounding spaces, equals the reference output."""
    responses = generate_responses(model, tokenizer, dataset, max_new_tokens, batch_size)
    hits = [response.strip() == record["output"].strip() for response, record in zip(responses, dataset, strict=True)]
    return sum(hits) / len(hits)
