"""Known model shapes, so that a run can be planned or rehearsed without downloading weights.

`resolve_config("llama-2-7b")` gives the Llama-2-7B configuration (Touvron et al. 2023, arXiv 2307.09288,
table 1: 32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000); a local directory or a hub id gives
that checkpoint's own config.json.
"""

from pathlib import Path

from transformers import AutoConfig, LlamaConfig

KNOWN = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
}


def resolve_config(spec):
    """A config from a known architecture name, a local checkpoint directory, or a hub id."""
    if spec in KNOWN:
        return LlamaConfig(**KNOWN[spec])
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise FileNotFoundError(f"{spec} has no config.json: point at a checkpoint directory saved with "
                                    f"save_pretrained, or use one of {sorted(KNOWN)}")
        return AutoConfig.from_pretrained(spec)
    try:
        return AutoConfig.from_pretrained(spec)
    except OSError as error:
        raise ValueError(f"cannot find a model called {spec!r}: it is not one of {sorted(KNOWN)}, not a local "
                         "directory, and the hub did not answer for it (offline?)") from error
