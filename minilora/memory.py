"""The memory plan of a QLoRA + AdaLoRA run: bytes by component, and the predicted peak.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) stores the frozen base in 4 bits and trains adapters
in 16/32 bits; what is left is adapters, their gradients, the optimizer states and the activations. This module
counts each of them from the model's config alone, for a Llama-architecture model, so a 7B run can be planned
on a laptop without its weights.
"""

import math
from dataclasses import dataclass, field

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_TABLE_BYTES = 16 * 4
DYNAMIC_MAP_BYTES = 256 * 4
DQ_BLOCKSIZE = 256


@dataclass
class RunSettings:
    """What the training run looks like, besides the model."""

    batch_size: int = 1
    seq_len: int = 512
    target_modules: tuple = LLAMA_PROJECTIONS
    init_r: int = 12
    blocksize: int = 64
    double_quant: bool = True
    compute_bytes: int = 4  # 4: float32 compute (CPU); 2: bfloat16 (GPU)
    base_bytes: int = 4  # embeddings, head and norms that stay unquantized
    adapter_bytes: int = 4  # adapters, their gradients and AdamW states are float32
    gradient_checkpointing: bool = True
    optimizer_resident_bytes: int | None = None  # PagedAdamW budget; None keeps every state resident


@dataclass
class MemoryPlan:
    """Rows of (component, bytes, note); `peak` is the predicted high-water mark of one training step."""

    rows: list = field(default_factory=list)
    peak: int = 0

    def bytes_of(self, component):
        return dict((name, size) for name, size, _ in self.rows)[component]

    def __str__(self):
        lines = [f"{'component':<34}{'bytes':>16}{'GiB':>9}  note"]
        for name, size, note in [*self.rows, ("predicted peak", self.peak, "resident at the worst moment")]:
            lines.append(f"{name:<34}{size:>16,}{size / 2**30:>9.3f}  {note}")
        return "\n".join(lines)


def linear_shapes(config):
    """(name, out_features, in_features) of the seven projections of one Llama decoder layer."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return [("q_proj", hidden, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, hidden),
            ("gate_proj", mlp, hidden), ("up_proj", mlp, hidden), ("down_proj", hidden, mlp)]


def nf4_bytes(numel, blocksize, double_quant):
    """(packed 4-bit codes, quantization constants and tables) of one NF4 tensor, as minilora.nf4 stores it."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4 + DYNAMIC_MAP_BYTES
    else:
        constants = 4 * blocks
    return math.ceil(numel / 2), constants + NF4_TABLE_BYTES


def activation_elements(config, settings):
    """Elements saved for backward per token, as eager PyTorch runs a Llama decoder with SDPA attention.

    Per layer without checkpointing: the layer input and its RMSNorm output, q and k after rotary embedding, v,
    the attention output and its reshaped copy, the residual sum and its norm (7 hidden + 2 key/value vectors),
    the MLP's gate, up, SiLU(gate) and product (4 MLP vectors), and r per adapter. With checkpointing each layer
    keeps only its input, and one layer's full set is rebuilt during its backward pass.
    """
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    adapters = sum(1 for name, _, _ in linear_shapes(config) if name in settings.target_modules)
    per_layer = 7 * hidden + 2 * kv + 4 * mlp + adapters * settings.init_r
    layers = config.num_hidden_layers
    if settings.gradient_checkpointing:
        return layers * hidden + per_layer
    return layers * per_layer


def plan_memory(config, settings=None):
    """Bytes by component for a QLoRA + AdaLoRA training step of a Llama-architecture `config`."""
    s = settings or RunSettings()
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    shapes = [shape for shape in linear_shapes(config) if shape[0] in s.target_modules]
    kept = [shape for shape in linear_shapes(config) if shape[0] not in s.target_modules]
    codes = constants = 0
    for _, out_f, in_f in shapes:
        c, k = nf4_bytes(out_f * in_f, s.blocksize, s.double_quant)
        codes, constants = codes + layers * c, constants + layers * k
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    unquantized = (heads * vocab * hidden + layers * (2 * hidden + sum(o * i for _, o, i in kept)) + hidden)
    adapter_params = layers * sum(s.init_r * (out_f + in_f + 1) for _, out_f, in_f in shapes)
    adapters = adapter_params * s.adapter_bytes
    states = 2 * adapters
    resident = states if s.optimizer_resident_bytes is None else min(states, s.optimizer_resident_bytes)
    tokens = s.batch_size * s.seq_len
    activations = tokens * activation_elements(config, s) * s.compute_bytes
    # Transients of one step: the logits and their log-softmax (and its gradient), and the largest dequantized
    # weight, which lives only inside one layer's forward or backward.
    logits = 3 * tokens * vocab * 4
    dequantized = max((o * i for _, o, i in shapes), default=0) * s.compute_bytes
    plan = MemoryPlan(rows=[
        ("quantized weights (NF4 codes)", codes, f"{len(shapes) * layers} matrices, 4 bits each"),
        ("quantization constants", constants, "double-quantized" if s.double_quant else "float32 absmax"),
        ("embeddings, head and norms", unquantized * s.base_bytes, "not quantized"),
        ("adapters", adapters, f"{adapter_params:,} trainable parameters"),
        ("gradients", adapters, "adapters only: the base is frozen"),
        ("optimizer states (resident)", resident, "AdamW: two moments per parameter"),
        ("optimizer states (paged out)", states - resident, "host memory, not on the compute device"),
        ("activations", activations, "with gradient checkpointing" if s.gradient_checkpointing else "all kept"),
        ("logits and loss", logits, "logits, log-softmax and its gradient"),
        ("dequantized weight (transient)", dequantized, "largest target matrix in the compute dtype"),
    ])
    plan.peak = sum(size for name, size, _ in plan.rows if name != "optimizer states (paged out)")
    return plan
