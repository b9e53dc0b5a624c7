"""Known model shapes, so that a run can be planned or rehearsed without downloading weights.

`resolve_config("llama-2-7b")` gives the Llama-2-7B configuration (Touvron et al. 2023, arXiv 2307.09288,
table 1: 32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000), and so for 13B and 70B (70B shares each
key/value head among 8 query heads, grouped-query attention); a local directory or a hub id gives that
checkpoint's own config.json.
"""

import re
from pathlib import Path

from transformers import AutoConfig, LlamaConfig

KNOWN = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def download(repo_id, weights=True, repo_type="model"):
    """Fetch a hub repository (needs internet the first time) and return its local directory: a model's config and
    tokenizer files, and its safetensors shards unless weights=False; or every file of a data set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    data = repo_type == "dataset"
    patterns = None if data else ["*.json", "tokenizer*"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except GatedRepoError:
        raise ValueError(f"{repo_id!r} is gated: accept its license on huggingface.co/{repo_id}, then log in with "
                         "`huggingface-cli login` or set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise ValueError(f"the hub has no {repo_id!r} that you may read: check the name, or log in "
                         "(`huggingface-cli login` or HF_TOKEN) if it is private") from None
    except Exception as error:
        instead = "a local file or directory" if data else f"a local checkpoint directory or one of {sorted(KNOWN)}"
        raise ValueError(f"cannot download {repo_id!r} from the hub ({type(error).__name__}). Offline? Pass "
                         f"{instead}") from error


def check_model_spec(spec):
    """Refuse, in one line, a model that is neither a known architecture, a checkpoint directory, nor a hub id."""
    directory = Path(spec).expanduser()
    if not str(spec).strip() or directory.is_file():
        raise FileNotFoundError(f"model={spec!r}: pass a checkpoint directory (the one that holds config.json), a hub "
                                f"id such as meta-llama/Llama-2-7b-hf, or one of {sorted(KNOWN)} (random weights)")
    if directory.is_dir() and not (directory / "config.json").exists():
        raise FileNotFoundError(f"model={spec!r} has no config.json: point at a checkpoint directory saved with "
                                f"save_pretrained, or use one of {sorted(KNOWN)}")
    if spec in KNOWN or directory.is_dir():
        return
    if re.match(r"^[.~/\\]", str(spec)) or str(spec).count("/") > 1:
        raise FileNotFoundError(f"model={spec!r}: no such directory; pass a checkpoint directory, a hub id such as "
                                f"meta-llama/Llama-2-7b-hf, or one of {sorted(KNOWN)} (random weights)")
    if not HUB_ID.match(str(spec)):
        raise ValueError(f"model={spec!r}: not a directory here, not a hub id 'owner/name' and not one of "
                         f"{sorted(KNOWN)} (random weights): pass one of those")


def resolve_config(spec):
    """A config from a known architecture name, a local checkpoint directory, or a hub id."""
    check_model_spec(spec)
    if spec in KNOWN:
        return LlamaConfig(**KNOWN[spec])
    directory = Path(spec).expanduser()
    return AutoConfig.from_pretrained(directory if directory.is_dir() else download(spec, weights=False))
