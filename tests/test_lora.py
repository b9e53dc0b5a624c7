"""minilora.lora: LoRALinear and the target-finding helpers, against peft's LoRA and on bad input."""

import peft
import pytest
import torch
import transformers
from torch import nn

from minilora.lora import LoRALinear, add_lora, count_parameters, find_linear_targets

TINY = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(TINY).eval()


def test_starts_as_the_base_layer_and_trains_only_the_adapter():
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, r=2, lora_alpha=4)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"A", "B"}
    assert layer.scaling == 2.0 and layer.delta_weight().abs().sum() == 0


def test_matches_peft_through_a_training_step():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = add_lora(tiny_llama(), targets, r=4, lora_alpha=8)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                module.B.normal_(std=0.1)
                other = theirs.base_model.model.get_submodule(name)
                other.lora_A["default"].weight.copy_(module.A)
                other.lora_B["default"].weight.copy_(module.B)
    assert count_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    tokens = torch.randint(0, 64, (2, 7))
    for model in (ours, theirs):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=0, atol=1e-5)


def test_targets_match_by_full_name_or_suffix():
    names = [name for name, _ in find_linear_targets(tiny_llama(), ["v_proj", "model.layers.0.mlp.up_proj"])]
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj"]
    assert len(find_linear_targets(tiny_llama(), "q_proj")) == 2


def test_only_targets_become_trainable():
    model = add_lora(tiny_llama(), ["q_proj"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.q_proj.{m}" for i in range(2) for m in "AB"}


@pytest.mark.parametrize(
    ("targets", "message"),
    [(["qproj"], "no linear layer matches.*q_proj"), ([], "target_modules is empty")],
)
def test_bad_targets_say_what_to_do(targets, message):
    with pytest.raises(ValueError, match=message):
        add_lora(tiny_llama(), targets)


def test_bad_layer_or_rank():
    with pytest.raises(TypeError, match="wraps a linear layer.*got Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        LoRALinear(nn.Linear(2, 2), r=0, lora_alpha=2)
