"""Instruction data for fine-tuning a causal language model: the prompt template, loading, tokenizing, exact match.

An instruction record is {"instruction", "input" (may be empty), "output"}. The model reads the Alpaca-style prompt

    ### Instruction:
    Reverse the word.
    ### Input:
    kamo
    ### Response:

and learns to continue it with the output and the end-of-sequence token. The loss is computed on the response
tokens only (labels = -100 on the prompt and on padding), as in instruction tuning (Alpaca; QLoRA, Dettmers et al.
2023, arXiv 2305.14314, section 5, trains on the target only). Data sets in two other common shapes are read too:
{"prompt", "completion"} records, and chat records {"messages": [{"role", "content"}, ...]} whose last message is
the assistant's answer (see checked_record).

The bundled data set and the tiny base model live in data/ and are made by data/make_dataset.py and
data/pretrain_base.py (see data/README.md).
"""

import csv
import io
import json
from pathlib import Path

import torch
from jinja2 import TemplateError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
INSTRUCTIONS_DIR = DATA_DIR / "instructions"
BASE_MODEL_DIR = DATA_DIR / "tiny-llama"
HEADERS = ("### Instruction:", "### Input:", "### Response:")
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips
EXAMPLE_RECORD = '{"instruction": "Reverse the word.", "input": "kamo", "output": "omak"}'


def format_prompt(record, tokenizer=None):
    """Return (prompt, full text): the prompt the model reads, and the prompt followed by the reference output.

    An instruction record gets the template above; its Input section is left out when the input is empty. A
    {"prompt", "output"} record is read as it is. A {"messages", "output"} record (a conversation before the
    answer) is rendered by the tokenizer's chat template when it has one, else by the template's headers
    ("### User:", ...). The end-of-sequence token is not text: `tokenize_record` appends it as a token id.
    """
    if "messages" in record:
        prompt = chat_prompt(record["messages"], tokenizer)
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        instruction, given = HEADERS[0], record.get("input") or ""
        prompt = f"{instruction}\n{record['instruction']}\n"
        if given:
            prompt += f"{HEADERS[1]}\n{given}\n"
        prompt += f"{HEADERS[2]}\n"
    return prompt, prompt + record["output"]


def chat_prompt(messages, tokenizer=None):
    """A conversation as the text the model continues with its answer."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except TemplateError as error:
            raise ValueError(f"the tokenizer's chat template refuses a conversation with the roles "
                             f"{[m['role'] for m in messages]} ({error}): use the roles it knows") from None
        bos = tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text  # tokenize_record adds the bos id itself
    return "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n" for m in messages) + "### Assistant:\n"


def looks_like_a_path(source):
    text = str(source)
    return (Path(text).suffix.lower() in DATA_SUFFIXES or text.startswith((".", "/", "~"))
            or text.count("/") > 1 or "\\" in text)


DATA_SUFFIXES = (".jsonl", ".json", ".csv")
MAX_RECORD_CHARS = 1_000_000  # far beyond any context length: tokenizing such a record would take gigabytes
RECORD_KINDS = {  # fields that name a kind of record: what it is called, and an example
    "instruction": ("an instruction record", EXAMPLE_RECORD),
    "prompt": ("a prompt/completion record", '{"prompt": "2 + 3 =", "completion": " 5"}'),
    "messages": ("a chat record", '{"messages": [{"role": "user", "content": "Hi"}, '
                                  '{"role": "assistant", "content": "Hello"}]}'),
}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev", "eval"), "test": ("test",)}


def read_records(path):
    """The records of one local file, each checked, as a datasets.Dataset. A .jsonl file holds one JSON object per
    line (blank lines are skipped), a .json file one JSON list of objects, a .csv file a header row and one record
    per row. An error names the file and the line (or, in a .json list, the record's index), what is wrong, and
    what a record must look like."""
    from datasets import Dataset

    path = Path(path)
    text, suffix = path.read_text(encoding="utf-8-sig"), path.suffix.lower()  # -sig: a byte-order mark is skipped
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); a .json file holds one list "
                             f"of records (use .jsonl for one record per line)") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json file must hold a list of records, found a {type(rows).__name__}")
        located = [(f"{path}, record {i}", row) for i, row in enumerate(rows)]
    elif suffix == ".jsonl":
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"{path}, line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one "
                                     f"record such as {EXAMPLE_RECORD}") from None
    elif suffix == ".csv":
        reader, located = csv.DictReader(io.StringIO(text)), []
        for row in reader:
            if None in row:  # csv puts the values past the header's columns under the key None
                raise ValueError(f"{path}, line {reader.line_num}: more values than the header has columns: put a "
                                 'value that holds a comma in double quotes')
            located.append((f"{path}, line {reader.line_num}", row))
    else:
        raise ValueError(f"{path}: data must be a .jsonl file (one record per line), a .json list of records or a "
                         f".csv table with a header row; a record looks like {EXAMPLE_RECORD}")
    if not located:
        raise ValueError(f"{path} holds no records; a record looks like {EXAMPLE_RECORD}")
    return Dataset.from_list(checked_records(located))


def checked_records(located):
    """Each (where, row) as a checked record; all of one kind, since a data set has one set of columns."""
    records, first_kind = [], None
    for where, row in located:
        record = checked_record(row, where)
        if not record["output"].strip():
            raise ValueError(f"{where}: the answer is empty, so there is nothing to learn: fill it in or leave the "
                             "record out")
        size = len(format_prompt(record)[1])
        if size > MAX_RECORD_CHARS:
            raise ValueError(f"{where}: a record of {size:,} characters, more than any "
                             f"max_length holds ({MAX_RECORD_CHARS:,} at most): split it or leave it out")
        kind = next(key for key in RECORD_KINDS if key in record)
        first_kind = first_kind or (kind, where)
        if kind != first_kind[0]:
            raise ValueError(f"{where} is {RECORD_KINDS[kind][0]} but {first_kind[1]} is "
                             f"{RECORD_KINDS[first_kind[0]][0]}: use one kind of record per file")
        records.append(record)
    return records


def checked_record(row, where):
    """One record in the form format_prompt reads, or an error that says where and what is wrong:
    {"instruction", "input", "output"}, {"prompt", "output"} (from "prompt" and "completion") or {"messages",
    "output"} (from "messages" ending with the assistant's answer)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record must be a JSON object such as {EXAMPLE_RECORD}, found {row!r:.60}")
    row = {key: value for key, value in row.items() if value is not None}  # a table's empty cells count as missing
    if "messages" in row:
        return checked_chat(row["messages"], where)
    if "prompt" in row or "completion" in row:
        needed, record = ("prompt", "completion"), {"prompt": row.get("prompt"), "output": row.get("completion")}
    else:
        needed = ("instruction", "output")
        record = {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
    missing = [key for key in needed if key not in row]
    if missing:
        kinds = "; ".join(f"{name}: {example}" for name, example in RECORD_KINDS.values())
        raise ValueError(f"{where}: the record lacks {missing} (its fields: {sorted(row)}); rename the fields to one "
                         f"of these kinds of record: {kinds}")
    for key, value in record.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, found {value!r:.60}: write it in quotes")
    return record


def checked_chat(messages, where):
    """{"messages": the conversation before the answer, "output": the answer} from a chat record's messages."""
    example = RECORD_KINDS["messages"][1]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects, such as {example}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: message {i} must be an object with string 'role' and 'content', found "
                             f"{message!r:.60}")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ValueError(f"{where}: a chat record ends with the answer to learn, a message with role 'assistant' "
                         f"after at least one other message, such as {example}")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
            "output": messages[-1]["content"]}


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


def split_files(directory):
    """{split: file} of a data directory: train, validation and test files by their usual names (validation may be
    called valid, val, dev or eval), as .jsonl, .json or .csv. Anything else that looks like data is refused."""
    files, others = {}, []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in DATA_SUFFIXES:
            continue
        split = next((split for split, names in SPLIT_NAMES.items() if path.stem in names), None)
        if split is None:
            others.append(path.name)
        elif split in files:
            raise ValueError(f"{directory} holds two {split} files, {files[split].name} and {path.name}: keep one")
        else:
            files[split] = path
    if "train" not in files or others:
        raise FileNotFoundError(f"the directory {directory} must hold a train file (.jsonl, .json or .csv) and may "
                                f"hold validation and test files{'; rename ' + ', '.join(others) if others else ''} "
                                "(or pass one file: its validation and test records are then held out from it)")
    return {split: files[split] for split in SPLIT_NAMES if split in files}


def load_instructions(source=None, split=None):
    """Load instruction records as a datasets.DatasetDict, or one split of it as a Dataset when `split` is given.

    source: None for the bundled data set (data/instructions/, splits train/validation/test); a directory holding
    train, validation and test files (see split_files); one .jsonl, .json or .csv file (loaded as split "train");
    or a Hugging Face hub data set id such as "tatsu-lab/alpaca" (downloaded the first time). Every record is
    checked (see checked_record).
    """
    from datasets import Dataset, DatasetDict

    from minilora.architectures import HUB_ID, download

    source = INSTRUCTIONS_DIR if source is None else source
    if not str(source).strip():
        raise ValueError("data='': name a file, a directory or a hub data set (leave it unset for the bundled set)")
    path = Path(source).expanduser()
    if path.is_dir():
        data = DatasetDict({split: read_records(file) for split, file in split_files(path).items()})
    elif path.is_file():
        data = DatasetDict({"train": read_records(path)})
    elif looks_like_a_path(source):
        raise FileNotFoundError(f"no such file or directory: {path}. Pass an existing .jsonl file or directory, "
                                f"None for the bundled data set, or a hub id such as 'tatsu-lab/alpaca'")
    elif HUB_ID.match(str(source)):
        hub = _quiet_load(str(download(str(source), repo_type="dataset")))
        data = DatasetDict({name: Dataset.from_list(checked_records(
            (f"{source}, split {name}, record {i}", row) for i, row in enumerate(part))) for name, part in hub.items()})
    else:
        raise FileNotFoundError(f"data={source!r}: not a file or directory here, and not a hub data set id "
                                "'owner/name' such as tatsu-lab/alpaca")
    if split is None:
        return data
    if split not in data:
        raise ValueError(f"split {split!r} is not in {source}; its splits are {list(data)}")
    return data[split]


def load_base_model(path=BASE_MODEL_DIR, dtype=torch.float32):
    """Load a causal LM and its tokenizer from a local directory (the bundled tiny Llama by default) or a hub id."""
    from transformers import AutoModelForCausalLM

    if looks_like_a_path(path) and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"no model (config.json) in {path}; for the bundled tiny model run "
                                f"`python data/pretrain_base.py` from the repository root")
    tokenizer = load_tokenizer(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path=BASE_MODEL_DIR):
    """A model's tokenizer, ready for batches. One without a padding token (Llama-2's has none) pads with its
    end-of-sequence token: padded positions are masked out of attention and loss, so their id does not matter."""
    from transformers import AutoTokenizer

    directory = Path(path).expanduser()
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}): save one there "
                                "with tokenizer.save_pretrained, or copy those files from the original checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no end-of-sequence token, which marks where an answer ends: "
                         "set tokenizer.eos_token and save it again")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    model sees), and the first len(prompt tokens) positions are masked with IGNORE_INDEX. A record longer than
    max_length tokens is refused, not cut: cutting would drop the answer's end (see fit_to_length).
    """
    prompt, full = format_prompt(record, tokenizer)
    n_prompt = len(_ids_with_bos(prompt, tokenizer))
    ids = _ids_with_bos(full, tokenizer) + [tokenizer.eos_token_id]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"max_length={max_length} but the record has {len(ids)} tokens (prompt, answer and "
                         "end-of-sequence): raise max_length, or leave the record out (fit_to_length does)")
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def fit_to_length(dataset, tokenizer, max_length):
    """The records of `dataset` that fit in max_length tokens, and their tokenized features; the others are left
    out, not cut (a cut record teaches an answer without its end, or no answer at all). Return (the fitting
    records as a Dataset, their features, how many were left out, the longest record's length in tokens)."""
    features, kept, lengths = [], [], []
    for i, record in enumerate(dataset):
        feature = tokenize_record(record, tokenizer)
        lengths.append(len(feature["input_ids"]))
        if lengths[-1] <= max_length:
            features.append(feature)
            kept.append(i)
    if lengths and not kept:
        raise ValueError(f"max_length={max_length} but every one of the {len(lengths)} records is longer (the shortest "
                         f"has {min(lengths)} tokens): raise max_length")
    return dataset.select(kept), features, len(lengths) - len(kept), max(lengths, default=0)


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
        prompts = [_ids_with_bos(format_prompt(r, tokenizer)[0], tokenizer) for r in chunk]
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
