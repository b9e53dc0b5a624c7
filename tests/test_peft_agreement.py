"""minilora's AdaLoRA against peft's, step by step, on a tiny LlamaForCausalLM in float64.

Both runs start from the same base model and the same adapter weights (peft's A, E, B copied into minilora's
Q, lam, P, with minilora's scaling set to peft's alpha / (r + 1e-5)), see the same batches and use the same
optimizer. The schedule covers warm-up, the cubic budget phase with delta_t = 2, the final mask and the frozen
phase after it, and ends with modules at rank 0. Tolerances: losses and weights agree to 1e-12 (float64 rounding
of differently ordered but equal sums); budgets, masks and rank patterns are compared exactly.
"""

import copy

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from minilora.adalora import AdaLoRAConfig, add_adalora
from minilora.budget import cubic_budget
from minilora.orthogonal import orthogonal_penalty

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=1, lora_alpha=8, beta1=0.85, beta2=0.85)
T, T_INIT, T_FINAL, DELTA_T, ORTH = 24, 3, 6, 2, 0.1
VOCAB = 64


def causal_lm_loss_float64(logits, labels, vocab_size, **kwargs):
    """Next-token cross-entropy without transformers' cast of the logits to float32."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread (and far faster on a busy machine)
    try:
        yield side_by_side()
    finally:
        torch.set_num_threads(threads)


def side_by_side():
    """Train peft's AdaLoRA and minilora's on the same model and data; record what both did at every step."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # build every weight (peft's adapters too) in float64
    try:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )
        base = LlamaForCausalLM(config)
        base.loss_function = causal_lm_loss_float64
        peft_model = get_peft_model(
            copy.deepcopy(base),
            AdaLoraConfig(
                task_type="CAUSAL_LM", target_modules=TARGETS, tinit=T_INIT, tfinal=T_FINAL, deltaT=DELTA_T,
                total_step=T, orth_reg_weight=ORTH, **SCHEDULE,
            ),
        )
        model, allocator = add_adalora(
            copy.deepcopy(base),
            AdaLoRAConfig(
                target_modules=TARGETS, t_init=T_INIT, t_final=T_FINAL, delta_t=DELTA_T, total_steps=T,
                orth_reg_weight=ORTH, **SCHEDULE,
            ),
        )
    finally:
        torch.set_default_dtype(default)

    peft_layers = {name: peft_model.base_model.model.get_submodule(name) for name in allocator.adapters}
    with torch.no_grad():
        for name, layer in allocator.adapters.items():
            theirs = peft_layers[name]
            layer.P.copy_(theirs.lora_B["default"])
            layer.lam.copy_(theirs.lora_E["default"].view(-1))
            layer.Q.copy_(theirs.lora_A["default"])
            layer.scaling = SCHEDULE["lora_alpha"] / (SCHEDULE["init_r"] + 1e-5)

    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.02)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    assert len(peft_opt.param_groups[0]["params"]) == len(opt.param_groups[0]["params"]) == 3 * len(TARGETS) * 2

    batches = torch.Generator().manual_seed(1)
    steps = []
    for step in range(T):
        ids = torch.randint(0, VOCAB, (4, 16), generator=batches)
        out = peft_model(input_ids=ids, labels=ids)  # peft adds the orthogonal term to out.loss here
        task = model(input_ids=ids, labels=ids).loss
        loss = task + ORTH * orthogonal_penalty(model)
        out.loss.backward()
        loss.backward()
        peft_opt.step()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        allocator.step(step)
        peft_pattern = peft_model.peft_config["default"].rank_pattern
        steps.append(
            {
                "step": step,
                "peft_loss": out.loss.item(),
                "peft_task": causal_lm_loss_float64(out.logits, ids, VOCAB).item(),
                "loss": loss.item(),
                "task": task.item(),
                "peft_budget": peft_model.base_model.rankallocator.budget_schedule(step)[0],
                "budget": allocator.budget,
                "peft_zero": {n: (peft_layers[n].lora_E["default"].view(-1) == 0).tolist() for n in peft_layers},
                "zero": {n: (layer.lam == 0).tolist() for n, layer in allocator.adapters.items()},
                "peft_pattern": None if peft_pattern is None else {
                    n.removesuffix(".lora_E.default"): kept for n, kept in peft_pattern.items()
                },
                "pattern": copy.deepcopy(allocator.rank_pattern),
                "weight_diff": max(
                    (ours - theirs.view_as(ours)).abs().max().item()
                    for name, layer in allocator.adapters.items()
                    for ours, theirs in (
                        (layer.P, peft_layers[name].lora_B["default"]),
                        (layer.lam, peft_layers[name].lora_E["default"]),
                        (layer.Q, peft_layers[name].lora_A["default"]),
                    )
                ),
            }
        )
        peft_opt.zero_grad()
        opt.zero_grad()
    return steps, allocator


def test_peft_adds_the_orthogonal_term_inside_the_causal_lm_forward(run):
    steps, _ = run
    for s in steps:
        assert s["peft_loss"] - s["peft_task"] > 1e-3  # the regularizer is there ...
        assert s["peft_loss"] - s["peft_task"] == pytest.approx(s["loss"] - s["task"], abs=1e-12)  # ... and the same


def test_losses_and_weights_agree_at_every_step(run):
    steps, _ = run
    for s in steps:
        assert s["loss"] == pytest.approx(s["peft_loss"], abs=1e-12, rel=0), s["step"]
        assert s["weight_diff"] < 1e-12, s["step"]


def test_budgets_agree_through_every_phase(run):
    steps, allocator = run
    budgets = [s["budget"] for s in steps]
    assert budgets == [s["peft_budget"] for s in steps]
    b0, bT = 4 * len(allocator.adapters), len(allocator.adapters)
    assert budgets == [cubic_budget(t, b0, bT, T_INIT, T_FINAL, T) for t in range(T)]
    assert budgets[: T_INIT + 1] == [b0] * (T_INIT + 1) and budgets[T - T_FINAL :] == [bT] * T_FINAL
    assert len(set(budgets[T_INIT + 1 : T - T_FINAL])) > 5  # the cubic phase really shrinks step by step


def test_masks_agree_at_every_step(run):
    steps, allocator = run
    mask_steps = [entry["step"] for entry in allocator.rank_history]
    assert mask_steps == [4, 6, 8, 10, 12, 14, 16, 18]  # every delta_t = 2 steps after warm-up, then the final
    for s in steps:
        assert s["zero"] == s["peft_zero"], s["step"]
        if s["step"] in mask_steps:
            assert s["pattern"] == s["peft_pattern"], s["step"]
            # tie-free scores: peft's `score <= threshold` kept exactly b(t) triplets too
            assert sum(map(sum, s["peft_pattern"].values())) == s["budget"]


def test_final_rank_pattern_agrees_and_prunes_modules_to_rank_zero(run):
    steps, allocator = run
    assert allocator.rank_pattern == steps[-1]["peft_pattern"]
    assert all(s["pattern"] == allocator.rank_pattern for s in steps[T - T_FINAL :])
    ranks = allocator.ranks
    assert sum(ranks.values()) == len(TARGETS) * 2 * SCHEDULE["target_r"]
    assert min(ranks.values()) == 0 and max(ranks.values()) > SCHEDULE["target_r"]
