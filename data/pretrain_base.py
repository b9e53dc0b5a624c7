"""Build the character-level tokenizer and pretrain the tiny Llama base model on plain text; save to data/tiny-llama/.

The model has the Llama-2 architecture and module names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj,
lm_head), only smaller. It is pretrained on plain sentences about the world of data/make_dataset.py ("kamo
backwards is omak.", "12 plus 7 is 19."), never on the instruction format, so it knows facts and skills but cannot
follow an instruction prompt yet: that is what the capstone's QLoRA+AdaLoRA tune teaches it.

Deterministic: seeded data and initialisation, torch.use_deterministic_algorithms, a fixed number of threads (the
same CPU type and torch version reproduce the same weights). Takes about 10 minutes on 2 CPU cores.
Run from the repository root: `python data/pretrain_base.py` (after `python data/make_dataset.py`).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_dataset import SEED, pretraining_documents, sentence  # noqa: E402

from minilora.data import BASE_MODEL_DIR, HEADERS, exact_match, load_instructions  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline and printable ASCII
ARCHITECTURE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False)


def build_tokenizer():
    """A character-level tokenizer (a BPE model with no merges) plus the three prompt headers as whole tokens.

    The headers are never seen in pretraining; as single tokens they keep instruction prompts short.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(header, normalized=False) for header in HEADERS])
    tok.decoder = decoders.Fuse()
    # like Llama's tokenizer: tokenizer(text) starts with <s>
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=ARCHITECTURE["max_position_embeddings"])


def token_blocks(tokenizer, n_docs, block, seed):
    """Concatenate <s> doc </s> for n_docs documents and cut the stream into rows of `block` tokens."""
    stream = []
    for ids in tokenizer(pretraining_documents(n_docs, seed), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block)


def learning_rate(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, blocks, batch_size=64):
    model.eval()
    losses = [model(input_ids=blocks[i:i + batch_size], labels=blocks[i:i + batch_size]).loss.item()
              for i in range(0, len(blocks), batch_size)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def probe_facts(model, tokenizer, n_per_task=40, seed=SEED + 7):
    """Greedy completion of plain-text facts cut before the answer ("kamo backwards is "): accuracy per task."""
    import random

    from make_dataset import PRETRAIN_WEIGHTS

    rng = random.Random(seed)
    model.eval()
    accuracy = {}
    for task in PRETRAIN_WEIGHTS:
        facts = [sentence(task, rng) for _ in range(n_per_task)]
        prompts = [[tokenizer.bos_token_id] + tokenizer(before, add_special_tokens=False)["input_ids"]
                   for before, _, _ in facts]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), max_new_tokens=10,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        hits = [text.startswith(answer + after) if after else text.split(" ")[0] == answer
                for text, (_, answer, after) in zip(texts, facts, strict=True)]
        accuracy[task] = sum(hits) / len(hits)
    model.train()
    return accuracy


def pretrain(steps, batch_size, block, lr, warmup, seed, threads, log_every=50):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **ARCHITECTURE)
    model = LlamaForCausalLM(config)
    n_docs = steps * batch_size * block // 100 + 1000  # a document is ~115 characters: enough for every step
    train = token_blocks(tokenizer, n_docs, block, seed)[: steps * batch_size]
    if len(train) < steps * batch_size:
        raise RuntimeError(f"only {len(train)} training rows for {steps} steps x {batch_size}; make more documents")
    held_out = token_blocks(tokenizer, 500, block, seed + 100)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}; "
          f"{steps} steps x {batch_size} rows x {block} tokens", flush=True)
    log, start = [], time.time()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        rows = train[step * batch_size:(step + 1) * batch_size]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "train_loss": round(loss.item(), 4)}
            if (step + 1) % (8 * log_every) == 0 or step + 1 == steps:
                entry["held_out_loss"] = round(held_out_loss(model, held_out), 4)
                entry["fact_accuracy"] = {k: round(v, 3) for k, v in probe_facts(model, tokenizer).items()}
            log.append(entry)
            print(entry, f"{time.time() - start:.0f} s", flush=True)
    return model, tokenizer, log, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=64, help="tokens per training row")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; keep it fixed to reproduce weights")
    parser.add_argument("--out", type=Path, default=BASE_MODEL_DIR)
    args = parser.parse_args()
    model, tokenizer, log, seconds = pretrain(args.steps, args.batch_size, args.block, args.lr, args.warmup,
                                              args.seed, args.threads)
    print(f"pretraining took {seconds / 60:.1f} min")
    zero_shot = {s: exact_match(model, tokenizer, load_instructions(split=s)) for s in ("validation", "test")}
    print("zero-shot instruction exact match:", {k: round(v, 3) for k, v in zero_shot.items()})
    model.generation_config.do_sample = False
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    summary = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
               "log": log, "zero_shot_exact_match": zero_shot}
    (args.out / "pretraining_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
