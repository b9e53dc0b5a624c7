"""plan_memory: exact byte counts for the quantized base, and the components a run adds."""

import dataclasses

import pytest

from minilora.architectures import resolve_config
from minilora.memory import RunSettings, nf4_bytes, plan_memory

LLAMA_7B = resolve_config("llama-2-7b")


def bits_per_parameter(numel, blocksize, double_quant):
    codes, constants = nf4_bytes(numel, blocksize, double_quant)
    return 8 * (codes + constants) / numel


def test_bits_per_parameter_match_the_qlora_paper():
    # QLoRA section 3: 4 + 32/64 = 4.5 bits without, 4 + 8/64 + 32/(64·256) = 4.127 with double quantization.
    assert bits_per_parameter(4096 * 4096, 64, False) == pytest.approx(4.5, abs=1e-3)
    assert bits_per_parameter(4096 * 4096, 64, True) == pytest.approx(4.127, abs=1e-3)


def test_quantized_7b_linear_weights_take_3_34_gb():
    plan = plan_memory(LLAMA_7B)
    quantized = plan.bytes_of("quantized weights (NF4 codes)") + plan.bytes_of("quantization constants")
    assert quantized / 1e9 == pytest.approx(3.34, abs=0.005)
    linear_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert plan.bytes_of("quantized weights (NF4 codes)") == linear_params // 2


def test_adapters_gradients_and_states():
    settings = RunSettings(init_r=8, target_modules=("q_proj", "v_proj"))
    plan = plan_memory(LLAMA_7B, settings)
    params = 32 * 2 * 8 * (4096 + 4096 + 1)  # P, Q and λ of each adapter
    assert plan.bytes_of("adapters") == plan.bytes_of("gradients") == 4 * params
    assert plan.bytes_of("optimizer states (resident)") == 8 * params


def test_paging_moves_states_off_the_device_and_lowers_the_peak():
    settings = RunSettings()
    paged = dataclasses.replace(settings, optimizer_resident_bytes=2**20)
    full, small = plan_memory(LLAMA_7B, settings), plan_memory(LLAMA_7B, paged)
    states = full.bytes_of("optimizer states (resident)")
    assert small.bytes_of("optimizer states (resident)") == 2**20
    assert small.bytes_of("optimizer states (paged out)") == states - 2**20
    assert full.peak - small.peak == states - 2**20


def test_checkpointing_keeps_one_vector_per_layer_and_token():
    keep_all = plan_memory(LLAMA_7B, RunSettings(gradient_checkpointing=False))
    checkpointed = plan_memory(LLAMA_7B, RunSettings(gradient_checkpointing=True))
    ratio = keep_all.bytes_of("activations") / checkpointed.bytes_of("activations")
    assert 3 < ratio < 32, "checkpointing saves most, but not all, activation memory"
    assert str(checkpointed).splitlines()[-1].startswith("predicted peak")


def test_the_peak_is_what_is_resident_at_the_worst_moment_never_two_transients_at_once():
    gpu = dict(device="cuda", compute_bytes=2, base_bytes=2)
    for settings in (RunSettings(), RunSettings(**gpu), RunSettings(**gpu, batch_size=16)):
        plan = plan_memory(LLAMA_7B, settings)
        names = [name for name, _ in plan.at_peak]
        assert sum(size for _, size in plan.at_peak) == plan.peak
        assert not {"logits and loss", "dequantized weight (transient)"} <= set(names), "they never coexist"
        assert ("optimizer page pool" in names) == (settings.device == "cpu"), "the pool is host memory on a GPU"
    # one 512-token sequence: a layer's backward is the worst moment; 16 of them: the loss's (16 x 512 x 32000 logits)
    assert plan_memory(LLAMA_7B, RunSettings(**gpu)).moment == "a layer's backward"
    assert plan_memory(LLAMA_7B, RunSettings(**gpu, batch_size=16)).moment == "the loss's backward"
