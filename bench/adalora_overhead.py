"""How much does AdaLoRA cost over plain LoRA of the same initial rank, in minilora and in peft?

One training step = forward, loss (+ the orthogonal penalty for AdaLoRA), backward, AdamW step, the rank
allocator (AdaLoRA only), zero_grad. All four setups train the same small transformers LlamaForCausalLM (built
from a config, random weights, float32 on the CPU) on the same batches. Measurements are interleaved: each
round runs a few steps of every setup in turn, and we report the median over rounds, so slow phases of a noisy
machine hit all setups alike. The AdaLoRA schedule keeps every timed step in the budget phase with delta_t = 1
(peft's default): scores are updated and a global mask is taken at every step, the most expensive case.

    .venv/bin/python bench/adalora_overhead.py [--rounds 7] [--steps 3] [--threads 1]
"""

import argparse
import copy
import statistics
import time

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.adalora import AdaLoRAConfig, add_adalora
from minilora.lora import add_lora
from minilora.orthogonal import orthogonal_penalty

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, ORTH, TOTAL = 8, 16, 0.1, 100_000


class Setup:
    """A model, its optimizer and what one training step does after backward."""

    def __init__(self, name, model, loss_fn, after_step=None):
        self.name, self.model, self.loss_fn, self.after_step = name, model, loss_fn, after_step
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.global_step = 0
        self.times = []

    def train(self, batch, steps):
        start = time.perf_counter()
        for _ in range(steps):
            self.loss_fn(self.model, batch).backward()
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step(self.global_step)
            self.optimizer.zero_grad()
            self.global_step += 1
        self.times.append((time.perf_counter() - start) / steps)


def build(base):
    def task_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    def adalora_loss(model, batch):
        return task_loss(model, batch) + ORTH * orthogonal_penalty(model)

    schedule = dict(init_r=RANK, target_r=RANK // 2, lora_alpha=ALPHA)
    mini_ada, allocator = add_adalora(copy.deepcopy(base), AdaLoRAConfig(
        target_modules=TARGETS, t_init=0, t_final=0, total_steps=TOTAL, delta_t=1, orth_reg_weight=ORTH, **schedule
    ))
    mini_lora = add_lora(copy.deepcopy(base), TARGETS, r=RANK, lora_alpha=ALPHA)
    peft_ada = get_peft_model(copy.deepcopy(base), AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=TARGETS, tinit=0, tfinal=0, total_step=TOTAL, deltaT=1,
        orth_reg_weight=ORTH, **schedule,  # peft adds the penalty inside its causal-LM forward
    ))
    peft_lora = get_peft_model(copy.deepcopy(base), LoraConfig(
        task_type="CAUSAL_LM", target_modules=TARGETS, r=RANK, lora_alpha=ALPHA
    ))
    return [
        Setup("minilora AdaLoRA", mini_ada, adalora_loss, allocator.step),
        Setup("minilora LoRA", mini_lora, task_loss),
        Setup("peft AdaLoRA", peft_ada, task_loss, peft_ada.base_model.update_and_allocate),
        Setup("peft LoRA", peft_lora, task_loss),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setup per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    base = LlamaForCausalLM(config)
    setups = build(base)
    batch = torch.randint(0, config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
    for setup in setups:  # warm-up: first calls allocate optimizer states and score buffers
        setup.train(batch, 2)
        setup.times.clear()
    for _ in range(args.rounds):
        for setup in setups:
            setup.train(batch, args.steps)

    median = {s.name: statistics.median(s.times) for s in setups}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"LlamaForCausalLM hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{len(TARGETS) * config.num_hidden_layers} adapted linear layers, rank {RANK}, batch {tuple(batch.shape)}, "
          f"{args.threads} thread(s); median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'setup':18s} {'step (ms)':>10s}")
    for name, seconds in median.items():
        print(f"{name:18s} {1000 * seconds:10.1f}")
    mini = median["minilora AdaLoRA"] / median["minilora LoRA"]
    ref = median["peft AdaLoRA"] / median["peft LoRA"]
    print(f"\n{'library':10s} {'AdaLoRA / LoRA step time':>26s}")
    print(f"{'minilora':10s} {mini:26.3f}")
    print(f"{'peft':10s} {ref:26.3f}")
    print(f"minilora's AdaLoRA overhead {'does not exceed' if mini <= ref else 'EXCEEDS'} peft's "
          f"({100 * (mini - 1):+.1f}% vs {100 * (ref - 1):+.1f}%)")
    print(f"minilora AdaLoRA step / peft AdaLoRA step: {median['minilora AdaLoRA'] / median['peft AdaLoRA']:.3f}")


if __name__ == "__main__":
    main()
