"""AdaLoRAConfig validation and add_adalora's model surgery (on a tiny LlamaForCausalLM built from a config)."""

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from minilora import AdaLoRAConfig, add_adalora
from minilora.adalora import attach_svd_adapters
from minilora.budget import RankAllocator
from minilora.lora import matches_target
from minilora.orthogonal import orthogonal_penalty
from minilora.svd_adapter import SVDLinear


def test_defaults_and_resolved_schedule():
    config = AdaLoRAConfig(target_modules=["q_proj"], total_steps=200)
    assert (config.init_r, config.target_r, config.delta_t) == (12, 8, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.init) == (0.85, 0.85, 0.5, "adalora")
    assert (config.t_init, config.t_final) == (20, 60)  # 10% warm-up, 30% final phase by default
    explicit = AdaLoRAConfig(target_modules="v_proj", total_steps=10, t_init=0, t_final=0)
    assert explicit.target_modules == ["v_proj"] and (explicit.t_init, explicit.t_final) == (0, 0)
    for total in range(1, 40):  # the default schedule always leaves a budget phase
        AdaLoRAConfig(target_modules=["q"], total_steps=total)


def test_defaults_are_peft_s_but_for_the_schedule():
    """Notebook 04 prints the two side by side; peft's 0 / 0 warm-up and final phase are the only differences."""
    import dataclasses

    from peft import AdaLoraConfig

    peft_names = {"init_r": "init_r", "target_r": "target_r", "t_init": "tinit", "t_final": "tfinal",
                  "total_steps": "total_step", "delta_t": "deltaT", "beta1": "beta1", "beta2": "beta2",
                  "orth_reg_weight": "orth_reg_weight", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
    ours = {f.name: f.default for f in dataclasses.fields(AdaLoRAConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(AdaLoraConfig)}
    assert {name for name, other in peft_names.items() if ours[name] != theirs[other]} == {"t_init", "t_final"}
    assert (theirs["tinit"], theirs["tfinal"]) == (0, 0) and theirs["init_lora_weights"] is True


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"total_steps": None}, r"needs total_steps: the number of optimizer steps"),
        ({"total_steps": 0}, r"total_steps=0 must be >= 1"),
        ({"t_init": 50, "t_final": 50}, r"budget phase is empty: t_init=50 >= total_steps - t_final = 100 - 50 = 50"),
        ({"t_init": 100, "t_final": 0}, r"budget phase is empty: t_init=100 >= .* Lower t_init or t_final"),
        ({"t_init": -1}, r"t_init=-1 and t_final=30 are step counts"),
        ({"target_r": 16}, r"target_r=16 is above init_r=12: AdaLoRA only removes ranks"),
        ({"target_r": 0}, r"target_r=0 must be >= 1"),
        ({"init_r": 0, "target_r": 0}, r"init_r=0 must be >= 1"),
        ({"beta1": 1.0}, r"beta1=1.0 must be in \(0, 1\)"),
        ({"beta2": 0.0}, r"beta2=0.0 must be in \(0, 1\)"),
        ({"delta_t": 0}, r"delta_t=0 is the number of steps between maskings"),
        ({"init": "loftq"}, r"unknown init 'loftq': use one of \('adalora', 'svd'\)"),
        ({"target_modules": []}, r"target_modules is empty: name the linear layers to adapt"),
        ({"orth_reg_weight": -0.1}, r"orth_reg_weight=-0.1 must be >= 0"),
        ({"lora_alpha": 0}, r"lora_alpha=0 must be > 0"),
        ({"lora_dropout": 1.5}, r"lora_dropout=1.5 must be in \[0, 1\)"),
    ],
)
def test_bad_configs_say_what_to_fix(changes, match):
    settings = {"target_modules": ["q_proj"], "total_steps": 100} | changes
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**settings)


def test_target_matching_follows_peft():
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_target("q_proj", ["q_proj"])
    assert matches_target("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not matches_target("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert not matches_target("model.layers.0.self_attn", ["q_proj"])


def test_add_adalora_on_tiny_llama():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    config = AdaLoRAConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=4, total_steps=20)
    model, allocator = add_adalora(model, config)
    assert isinstance(allocator, RankAllocator)
    replaced = sorted(name for name, module in model.named_modules() if isinstance(module, SVDLinear))
    assert replaced == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.rsplit(".", 1)[-1] in ("P", "lam", "Q") for name in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of size 8); per module out*r + r + r*in
    expected = 2 * ((32 * 6 + 6 + 6 * 32) + (16 * 6 + 6 + 6 * 32))
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(isinstance(m, nn.Linear) for m in (model.model.layers[0].mlp.up_proj, model.lm_head))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # Λ = 0: nothing changes at step 0


def test_svd_init_on_llama_keeps_the_logits():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    config = AdaLoRAConfig(target_modules=["o_proj", "down_proj"], init_r=4, target_r=2, total_steps=20, init="svd")
    names = attach_svd_adapters(model, config)
    assert len(names) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_one_training_step_follows_the_contract():
    model = tiny_llama()
    config = AdaLoRAConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_steps=5, t_init=0)
    model, allocator = add_adalora(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 7))
    model.train()
    loss = model(ids, labels=ids).loss + config.orth_reg_weight * orthogonal_penalty(model)
    loss.backward()
    optimizer.step()
    allocator.step(0)
    optimizer.zero_grad()
    lam = model.model.layers[0].self_attn.q_proj.lam
    assert torch.count_nonzero(lam) > 0  # the step moved λ off zero


def test_no_match_lists_the_linear_layers_it_saw():
    config = AdaLoRAConfig(target_modules=["query"], total_steps=10)
    with pytest.raises(ValueError, match=r"no linear layer matches target_modules=\['query'\].*'q_proj'"):
        attach_svd_adapters(tiny_llama(), config)
    with pytest.raises(ValueError, match="has no linear layers to adapt"):
        attach_svd_adapters(nn.Sequential(nn.ReLU()), config)


def test_refuses_a_model_that_already_has_adapters_or_a_foreign_config():
    config = AdaLoRAConfig(target_modules=["q_proj"], total_steps=10)
    model = tiny_llama()
    attach_svd_adapters(model, config)
    with pytest.raises(ValueError, match="already has SVD adapters"):
        attach_svd_adapters(model, config)
    with pytest.raises(TypeError, match="expected a minilora AdaLoRAConfig, got dict"):
        attach_svd_adapters(tiny_llama(), {"target_modules": ["q_proj"]})


def test_any_torch_model_works():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    config = AdaLoRAConfig(target_modules=["0", "2"], init_r=2, target_r=1, total_steps=10)
    model, _ = add_adalora(model, config)
    assert isinstance(model[0], SVDLinear) and isinstance(model[2], SVDLinear)
    assert model(torch.randn(4, 8)).shape == (4, 3)
