"""Saving, loading and exporting pruned AdaLoRA adapters and plain LoRA ones; peft's PeftModel.from_pretrained is the
export oracle. Outputs are compared within 1e-5: float32 logits of size ~1 from differently ordered sums of a few
dozen products (about 1e-7 apart here), so the margin only catches a wrong triplet or a wrong scale."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from minilora import AdaLoRAConfig, add_adalora
from minilora.adalora import attach_svd_adapters
from minilora.adapter_io import export_peft, load_adapter, read_adapter_meta, save_adapter, save_lora
from minilora.lora import add_lora
from minilora.orthogonal import orthogonal_penalty
from minilora.svd_adapter import SVDLinear

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def trained_looking(config, seed=1):
    """A tiny Llama with adapters holding random values and a rank pattern that leaves one layer at rank 0."""
    model = tiny_llama()
    attach_svd_adapters(model, config)
    generator = torch.Generator().manual_seed(seed)
    rank_pattern = {}
    for name, module in model.named_modules():
        if isinstance(module, SVDLinear):
            keep = torch.rand(config.init_r, generator=generator) > 0.4
            if name == "model.layers.1.self_attn.q_proj":
                keep[:] = False
            rank_pattern[name] = keep.tolist()
            with torch.no_grad():
                module.P.normal_(generator=generator)
                module.Q.normal_(generator=generator)
                module.lam.copy_(torch.randn(config.init_r, generator=generator) * keep)
    return model.eval(), rank_pattern


CONFIG = AdaLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_r=4, target_r=2, total_steps=10)


def test_save_writes_pruned_shapes_and_the_rank_pattern(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    save_adapter(model, tmp_path, CONFIG, rank_pattern)
    tensors = load_file(tmp_path / "minilora_adapter.safetensors")
    meta = read_adapter_meta(tmp_path)
    assert meta["rank_pattern"] == rank_pattern and AdaLoRAConfig(**meta["config"]) == CONFIG
    for name, flags in rank_pattern.items():
        kept = sum(flags)
        module = model.get_submodule(name)
        assert tensors[f"{name}.P"].shape == (module.out_features, kept)
        assert tensors[f"{name}.lam"].shape == (kept,)
        assert tensors[f"{name}.Q"].shape == (kept, module.in_features)
        assert torch.equal(tensors[f"{name}.lam"], module.lam.detach()[torch.tensor(flags)])
    assert tensors["model.layers.1.self_attn.q_proj.P"].shape == (32, 0)


def test_load_gives_the_saved_model_back(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    model.get_submodule("model.layers.0.self_attn.v_proj").scaling = 0.123  # an overridden scaling survives
    expected = logits(model)
    save_adapter(model, tmp_path, CONFIG, rank_pattern)
    loaded = load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    for name, module in model.named_modules():  # with the same triplets dropped, bit for bit
        if isinstance(module, SVDLinear):
            module.keep_triplets(rank_pattern[name])
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.get_submodule("model.layers.1.self_attn.q_proj").lam.shape == (0,)
    assert loaded.get_submodule("model.layers.0.self_attn.v_proj").scaling == 0.123


def test_round_trip_after_real_training_with_the_allocator(tmp_path):
    config = AdaLoRAConfig(["q_proj", "v_proj"], init_r=4, target_r=2, total_steps=6, t_init=1, t_final=2)
    model, allocator = add_adalora(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(config.total_steps):
        loss = model(IDS, labels=IDS).loss + config.orth_reg_weight * orthogonal_penalty(model)
        loss.backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
    model.eval()
    assert sum(sum(flags) for flags in allocator.rank_pattern.values()) == config.target_r * 4
    save_adapter(model, tmp_path, config, allocator.rank_pattern)
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path)), logits(model), atol=1e-5, rtol=1e-5)


def test_svd_init_round_trip_recomputes_the_residual_base(tmp_path):
    config = AdaLoRAConfig(target_modules=["o_proj"], init_r=3, target_r=2, total_steps=10, init="svd")
    model = tiny_llama()
    attach_svd_adapters(model, config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SVDLinear):
                module.lam.mul_(torch.tensor([1.5, 0.0, 0.7]))
    rank_pattern = {f"model.layers.{i}.self_attn.o_proj": [True, False, True] for i in range(2)}
    save_adapter(model, tmp_path, config, rank_pattern)
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path)), logits(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="init='svd' changed the base weights"):
        export_peft(model, tmp_path / "peft", config, rank_pattern)


def test_save_without_rank_pattern_keeps_everything(tmp_path):
    model, _ = trained_looking(CONFIG)
    save_adapter(model, tmp_path, CONFIG)
    assert all(all(flags) for flags in read_adapter_meta(tmp_path)["rank_pattern"].values())
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path)), logits(model))


@pytest.mark.parametrize("scaling", [None, 0.37])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, scaling):
    model, rank_pattern = trained_looking(CONFIG)
    if scaling is not None:
        for module in model.modules():
            if isinstance(module, SVDLinear):
                module.scaling = scaling
    expected = logits(model)
    export_peft(model, tmp_path, CONFIG, rank_pattern, task_type="CAUSAL_LM")
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):  # peft says it for its own files too
        reference = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reference), expected, atol=1e-5, rtol=1e-5)
    q1 = reference.base_model.model.model.layers[1].self_attn.q_proj
    assert q1.lora_A["default"].shape == (0, 32) and q1.lora_B["default"].shape == (32, 0)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["init_r"] == 4 and written["total_step"] == 10
    q0 = "model.layers.0.self_attn.q_proj"
    assert written["rank_pattern"][f"{q0}.lora_E"] == rank_pattern[q0]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_E" in keys


def test_bad_save_and_load_requests(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    partial = dict(list(rank_pattern.items())[1:])
    with pytest.raises(ValueError, match=r"does not match the model's adapters: missing \['model.layers.0"):
        save_adapter(model, tmp_path, CONFIG, partial)
    wrong = rank_pattern | {"model.layers.0.self_attn.q_proj": [True]}
    with pytest.raises(ValueError, match=r"has 1 flags but the adapter stores 4 triplets"):
        save_adapter(model, tmp_path, CONFIG, wrong)
    model.get_submodule("model.layers.0.self_attn.q_proj").merge()
    with pytest.raises(ValueError, match=r"merged into their base weights: call unmerge\(\) before saving"):
        save_adapter(model, tmp_path, CONFIG, rank_pattern)
    with pytest.raises(ValueError, match="has no SVDLinear adapters to save"):
        save_adapter(tiny_llama(), tmp_path, CONFIG)
    with pytest.raises(FileNotFoundError, match="is .* a directory written by save_adapter"):
        load_adapter(tiny_llama(), tmp_path / "nothing")


def test_loading_onto_another_base_model_fails_clearly(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    save_adapter(model, tmp_path, CONFIG, rank_pattern)
    with pytest.raises(ValueError, match=r"was saved with shape .* onto the base model it was trained on"):
        load_adapter(tiny_llama(hidden=48), tmp_path)
    with pytest.raises(ValueError, match="no linear layer matches target_modules"):
        load_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path)


def test_a_failed_load_leaves_the_model_as_it_was_and_a_retry_works(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    save_adapter(model, tmp_path / "good", CONFIG, rank_pattern)
    (tmp_path / "cut").mkdir()
    for name in ("minilora_adapter.json", "minilora_adapter.safetensors"):
        data = (tmp_path / "good" / name).read_bytes()
        (tmp_path / "cut" / name).write_bytes(data if name.endswith(".json") else data[: len(data) // 2])
    base = tiny_llama()
    before = logits(base)
    with pytest.raises(ValueError, match="minilora_adapter.safetensors cannot be read"):
        load_adapter(base, tmp_path / "cut")
    other = tiny_llama(hidden=48)
    other_before = logits(other)
    with pytest.raises(ValueError, match="was saved with shape"):
        load_adapter(other, tmp_path / "good")
    for untouched, reference in ((base, before), (other, other_before)):
        assert not any(isinstance(m, SVDLinear) for m in untouched.modules())
        assert torch.equal(logits(untouched), reference)
    assert torch.allclose(logits(load_adapter(base, tmp_path / "good")), logits(model), atol=1e-6)


def test_a_loaded_adapter_exports_to_peft_and_saves_again(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    expected = logits(model)
    save_adapter(model, tmp_path / "saved", CONFIG, rank_pattern)
    loaded = load_adapter(tiny_llama(), tmp_path / "saved")
    export_peft(loaded, tmp_path / "peft", CONFIG)
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {f"{name}.lora_E": flags for name, flags in rank_pattern.items()}
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        reference = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(reference), expected, atol=1e-5, rtol=1e-5)
    save_adapter(loaded, tmp_path / "again", CONFIG)  # the loaded flags, not "all of the stored ones"
    assert read_adapter_meta(tmp_path / "again")["rank_pattern"] == rank_pattern
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path / "again")), expected, atol=1e-5, rtol=1e-5)
    fewer = {name: [True] * sum(flags) for name, flags in rank_pattern.items()}  # prune the loaded layers further
    fewer["model.layers.0.self_attn.q_proj"][0] = False
    save_adapter(loaded, tmp_path / "fewer", CONFIG, fewer)
    first_kept = rank_pattern["model.layers.0.self_attn.q_proj"].index(True)
    assert read_adapter_meta(tmp_path / "fewer")["rank_pattern"]["model.layers.0.self_attn.q_proj"] == [
        flag and i != first_kept for i, flag in enumerate(rank_pattern["model.layers.0.self_attn.q_proj"])]


def test_the_base_model_is_recorded_so_auto_peft_finds_it(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "base")
    model, rank_pattern = trained_looking(CONFIG)
    save_adapter(model, tmp_path / "saved", CONFIG, rank_pattern, base_model=tmp_path / "base")
    recorded = read_adapter_meta(tmp_path / "saved")["base_model"]
    assert recorded == str((tmp_path / "base").resolve())
    export_peft(model, tmp_path / "peft", CONFIG, rank_pattern, base_model=recorded)
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        reference = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")
    torch.testing.assert_close(logits(reference), logits(model), atol=1e-5, rtol=1e-5)
    monkeypatch.chdir(tmp_path)  # a base loaded from a relative directory names itself, as an absolute path
    loaded = load_adapter(LlamaForCausalLM.from_pretrained("base"), tmp_path / "saved")
    export_peft(loaded, tmp_path / "from_loaded", CONFIG)
    written = json.loads((tmp_path / "from_loaded" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == recorded and written["task_type"] == "CAUSAL_LM"
    save_adapter(model, tmp_path / "hub", CONFIG, rank_pattern, base_model="meta-llama/Llama-2-7b-hf")
    assert read_adapter_meta(tmp_path / "hub")["base_model"] == "meta-llama/Llama-2-7b-hf"
    save_adapter(model, tmp_path / "unnamed", CONFIG, rank_pattern)
    assert read_adapter_meta(tmp_path / "unnamed")["base_model"] is None


def test_a_lora_run_saves_in_peft_format_with_the_same_outputs(tmp_path):
    model = add_lora(tiny_llama(), ["q_proj", "v_proj", "up_proj"], r=3, lora_alpha=6, lora_dropout=0.1).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_llama()), atol=1e-3)  # the adapters do change the outputs
    save_lora(model, tmp_path, ["q_proj", "v_proj", "up_proj"], r=3, lora_alpha=6, base_model="some/base")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 3 and written["lora_alpha"] == 6
    assert written["lora_dropout"] == 0.1 and written["base_model_name_or_path"] == "some/base"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (64, 3)
    reference = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reference), expected, atol=1e-5, rtol=1e-5)


def test_bad_export_and_lora_requests(tmp_path):
    model, rank_pattern = trained_looking(CONFIG)
    save_adapter(model, tmp_path / "saved", CONFIG, rank_pattern)
    loaded = load_adapter(tiny_llama(), tmp_path / "saved")
    with pytest.raises(ValueError, match=r"has 4 flags but the adapter stores [0-3] triplets: .* rank_pattern=None"):
        export_peft(loaded, tmp_path / "peft", CONFIG, rank_pattern)  # the loaded layers hold the kept ones only
    model.get_submodule("model.layers.0.self_attn.q_proj").keep_triplets([True, False, True, False])
    with pytest.raises(ValueError, match=r"q_proj stores 2 of its 4 initial triplets but does not record which"):
        export_peft(model, tmp_path / "peft", CONFIG)
    assert not (tmp_path / "peft").exists()
    lora = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no LoRALinear adapters to save: call add_lora first"):
        save_lora(model, tmp_path / "lora", ["q_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"v_proj has an adapter but target_modules=\['q_proj'\] does not name it"):
        save_lora(lora, tmp_path / "lora", "q_proj", r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"also names \['model.layers.0.mlp.up_proj'"):
        save_lora(lora, tmp_path / "lora", ["q_proj", "v_proj", "up_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match=r"has r=2 and scaling 2, but r=2, lora_alpha=8 give scaling 4"):
        save_lora(lora, tmp_path / "lora", ["q_proj", "v_proj"], r=2, lora_alpha=8)
    assert not (tmp_path / "lora").exists()
