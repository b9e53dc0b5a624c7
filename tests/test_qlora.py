"""NF4Linear (QLoRA eq. 5) against bitsandbytes' Linear4bit, quantize_model, streaming load_quantized, merging.

The streaming load's peak memory is measured in tests/test_memory_measured.py (it needs a fresh process)."""

import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from minilora import architectures, qlora
from minilora.adalora import AdaLoRAConfig, add_adalora
from minilora.memory import LLAMA_PROJECTIONS, nf4_bytes
from minilora.nf4 import dequantize_nf4
from minilora.qlora import (
    NF4Linear,
    UpcastLinear,
    checkpoint_tensors,
    compile_dequantize,
    dequantize_model,
    empty_model,
    fill_quantized,
    load_quantized,
    module_bytes,
    quantize_model,
    read_safetensors,
    store_embeddings_in,
)
from minilora.svd_adapter import SVDLinear

logging.disable_progress_bar()  # save_pretrained's tqdm bar
warnings.filterwarnings("ignore", category=FutureWarning)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97)


def tiny_config(**overrides):
    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def bnb_linear4bit(linear, compress_statistics):
    """bitsandbytes' Linear4bit holding the same weight and bias, NF4, float32 compute, on the CPU."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=compress_statistics,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=compress_statistics, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # .to() is what quantizes a Params4bit


def forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("bias", [True, False])
def test_same_outputs_and_input_gradients_as_linear4bit(bias):
    # Without double quantization the codes and the constants are bitsandbytes' own, and the product is the same torch
    # call on the same operands (F.linear with the bias), so it is bit for bit on any CPU.
    torch.manual_seed(0)
    linear = nn.Linear(320, 192, bias=bias)
    x = torch.randn(3, 5, 320)
    ours = forward_backward(NF4Linear.from_linear(linear, double_quant=False), x)
    theirs = forward_backward(bnb_linear4bit(linear, compress_statistics=False), x)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("bias", [True, False])
def test_a_weight_larger_than_a_slab_gives_the_products_of_the_whole_weight(bias):
    # On a CPU a weight of more than SLAB values is multiplied a slab at a time (rows forward, columns backward).
    # Each output element is still one sum of the same K products; a BLAS library may order a sum differently for
    # another number of columns, so the bound allows a reordered sum (|error| <= K u sum|x w| for each order). Where
    # this was run (AVX2, and torch's scalar kernels with one thread) the bits were the same.
    torch.manual_seed(0)
    linear = nn.Linear(1280, qlora.SLAB // 1280 * 2 + 3, bias=bias)  # 3 slabs of rows forward, 2 of columns back
    layer = NF4Linear.from_linear(linear)
    assert qlora.by_slabs(layer.quantized, None) and not qlora.by_slabs(layer.quantized, "inductor")
    whole = nn.Linear(1280, linear.out_features, bias=bias)
    with torch.no_grad():
        whole.weight.copy_(layer.dequantized_weight())
        if bias:
            whole.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 1280)
    (y, grad_x), (y_whole, grad_x_whole) = forward_backward(layer, x), forward_backward(whole, x)
    u, w = 2.0**-24, whole.weight.detach().abs()
    upstream = torch.linspace(-1, 1, y.shape[-1]).abs()  # forward_backward's weights on the outputs
    assert ((y - y_whole).abs() <= 2 * 1280 * u * (x.abs() @ w.T + 1)).all()
    assert ((grad_x - grad_x_whole).abs() <= 2 * w.shape[0] * u * (upstream @ w)).all()


def test_a_bfloat16_head_larger_than_a_slab_gives_the_float32_products_of_its_values():
    torch.manual_seed(0)
    head = nn.Linear(512, 3000, bias=False)  # 1.5 slabs: two slabs of rows forward, two of columns backward
    stored = UpcastLinear(head, torch.bfloat16)
    assert stored.weight.dtype == torch.bfloat16 and not stored.weight.requires_grad
    rounded = stored.weight.float()
    x = torch.randn(2, 3, 512, requires_grad=True)
    y = stored(x)
    upstream = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, upstream)
    u = 2.0**-24  # the same sums in possibly another order: |difference| <= 2 K u sum|terms|
    assert y.dtype == torch.float32
    assert ((y - x @ rounded.T).abs() <= 2 * 512 * u * (x.abs() @ rounded.abs().T)).all()
    assert ((grad_x - upstream @ rounded).abs() <= 2 * 3000 * u * (upstream.abs() @ rounded.abs())).all()
    with pytest.raises(ValueError, match="without bias"):
        UpcastLinear(nn.Linear(4, 4), torch.bfloat16)


def test_store_embeddings_in_leaves_a_model_it_cannot_store_as_it_was_and_runs_once():
    model = tiny_llama()
    model.lm_head.bias = nn.Parameter(torch.zeros(model.config.vocab_size))
    with pytest.raises(ValueError, match="Linear with a bias"):
        store_embeddings_in(model)
    assert model.get_input_embeddings().weight.dtype == torch.float32, "nothing changed before the refusal"
    model = store_embeddings_in(tiny_llama())
    head = model.lm_head
    assert store_embeddings_in(model).lm_head is head, "a second call changes nothing"
    assert model(TOKENS).logits.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    assert store_embeddings_in(tied).lm_head.weight.dtype == torch.float32


def test_only_a_cpu_weight_whose_rows_are_whole_blocks_goes_by_slabs():
    assert not qlora.by_slabs(NF4Linear(torch.randn(100, qlora.SLAB // 100 + 7)).quantized, None), "rows cut blocks"
    assert not qlora.by_slabs(NF4Linear(torch.randn(64, 128)).quantized, None), "smaller than a slab"
    assert not qlora.by_slabs(NF4Linear(torch.randn(2048, 1024)).to("meta").quantized, None), "not on a CPU"


def test_a_bias_made_trainable_gets_its_gradient_through_the_fused_call():
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    layer.bias.requires_grad_(True)
    layer(torch.randn(3, 5, 64)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((32,), 15.0))


def test_double_quantization_agrees_with_linear4bit_up_to_its_8bit_lookup():
    # bitsandbytes' CPU 8-bit quantizer picks the code of a constant through a lookup table and misses the nearest
    # code for a few constants (minilora.double_quant is exact). Stated tolerance: at most 1% of the 64-value
    # blocks dequantize differently, by at most 1% relative (one step of the 8-bit map), and outputs and input
    # gradients then differ by at most 1e-3 of their largest magnitude.
    torch.manual_seed(0)
    linear = nn.Linear(1024, 768)
    ours_layer, theirs_layer = NF4Linear.from_linear(linear), bnb_linear4bit(linear, compress_statistics=True)
    ours_w = ours_layer.dequantized_weight()
    theirs_w = bnb.functional.dequantize_4bit(theirs_layer.weight.data, theirs_layer.weight.quant_state)
    differ = ours_w != theirs_w
    assert differ.reshape(-1, 64).any(dim=1).float().mean() <= 0.01
    assert ((ours_w - theirs_w).abs() <= 0.01 * theirs_w.abs())[differ].all()
    x = torch.randn(4, 7, 1024)
    for ours, theirs in zip(forward_backward(ours_layer, x), forward_backward(theirs_layer, x), strict=True):
        assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()


def saved_tensors_of(layer, x):
    """Every tensor autograd saves while layer(x) runs: its shape, via saved_tensors_hooks."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    return y, shapes


def test_backward_keeps_no_weight_and_gives_the_dequantized_gradient():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 128))
    x = torch.randn(4, 256, requires_grad=True)
    y, saved = saved_tensors_of(layer, x)
    assert saved == [], "the frozen 4-bit layer saves nothing: backward dequantizes again"
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ dequantize_nf4(layer.quantized, torch.float32))
    adapted = SVDLinear(NF4Linear.from_linear(nn.Linear(256, 128)), r=8, lora_alpha=8)
    _, saved = saved_tensors_of(adapted, x)
    assert saved and (128, 256) not in saved and (256, 128) not in saved, "only the adapter's small tensors"


def test_one_dequantization_in_forward_and_one_more_in_backward(monkeypatch):
    layer = NF4Linear.from_linear(nn.Linear(64, 32))
    calls = []
    monkeypatch.setattr(qlora, "dequantize_nf4", lambda *args, **kw: calls.append(1) or dequantize_nf4(*args, **kw))
    layer(torch.randn(3, 64)).sum()  # an input without gradient (after a frozen embedding): forward only
    assert len(calls) == 1
    layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert len(calls) == 3, "backward dequantizes again instead of keeping the weight"


def test_compiled_dequantization_gives_the_same_logits_and_gradients():
    """compile_dequantize makes every NF4Linear dequantize through torch.compile, in forward and in backward; the
    backend here runs the traced graph as it is (tests/test_nf4.py says why), so the values must not move a bit."""
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    results = []
    for compiled in (False, True):
        model = tiny_llama(seed=3)
        quantize_model(model)
        if compiled:
            compile_dequantize(model, backend=recording)
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)  # a gradient that flows back through every NF4 layer
        logits = model(TOKENS).logits
        logits.square().mean().backward()
        results.append((logits.detach(), embeddings.weight.grad))
    assert graphs, "no dequantization went through torch.compile"
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_matches_an_nn_linear_holding_the_dequantized_weight():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(96, 48))
    dense = nn.Linear(96, 48)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 96)
    assert torch.equal(layer(x), dense(x))


def test_to_moves_the_codes_keeps_their_dtypes_and_adapters_follow():
    layer = NF4Linear.from_linear(nn.Linear(128, 64, bias=False))  # no Parameter to tell the device
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer(torch.randn(2, 128)).dtype == torch.bfloat16
    q = layer.quantized
    assert q.packed.dtype == torch.uint8 and q.absmax.dtype == torch.float32, "codes and constants keep dtypes"
    layer.to("meta")  # a second device that every machine has
    assert layer.device == torch.device("meta")
    assert layer.quantized.packed.is_meta and layer.quantized.absmax8.quantized.codes.is_meta
    adapter = SVDLinear(layer, r=4, lora_alpha=8)
    assert adapter.P.is_meta and adapter.Q.is_meta, "SVDLinear creates its adapter where the 4-bit weight lives"


def test_quantize_model_report_and_nf4_bytes_match_the_memory_plan():
    model = tiny_llama()
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # the rotary frequencies
    full_bytes = module_bytes(model)
    report = quantize_model(model)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert report["layers quantized"] == len(layers) == 7 * 2
    assert report["parameters"] == params and report["bytes before"] == full_bytes == 4 * params + buffers
    assert report["parameters quantized"] == sum(m.in_features * m.out_features for m in layers)
    assert report["full-precision parameters after"] == params - report["parameters quantized"]
    stored = sum(sum(nf4_bytes(m.in_features * m.out_features, 64, True)) for m in layers)
    assert report["bytes after"] == 4 * report["full-precision parameters after"] + buffers + stored
    assert isinstance(model.lm_head, nn.Linear), "the head stays in full precision"


def test_quantize_model_refuses_the_output_head():
    with pytest.raises(ValueError, match="'lm_head', the output head.*Leave it out"):
        quantize_model(tiny_llama(), target_modules=["q_proj", "lm_head"])


def test_quantize_model_gives_the_dequantized_model_logits():
    quantized = tiny_llama()
    quantize_model(quantized)
    dense = dequantize_model(copy.deepcopy(quantized))
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    with torch.no_grad():
        assert torch.equal(quantized(TOKENS).logits, dense(TOKENS).logits)


def save_sharded(model, directory, max_shard_size="60KB"):
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 1, "the test needs a multi-shard checkpoint"
    return shards


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True,
                                                                           "mlp_bias": True}],
                         ids=["llama", "tied-embeddings", "biases"])
def test_streamed_load_equals_quantizing_the_full_model(tmp_path, overrides):
    model = tiny_llama(**overrides)
    save_sharded(model, tmp_path)
    streamed = load_quantized(tmp_path)
    quantize_model(model)
    assert isinstance(streamed.model.layers[1].mlp.down_proj, NF4Linear)
    for ours, theirs in zip(streamed.modules(), model.modules(), strict=True):
        if isinstance(ours, NF4Linear):
            assert torch.equal(ours.quantized.packed, theirs.quantized.packed)
    with torch.no_grad():
        assert torch.equal(streamed(TOKENS).logits, model(TOKENS).logits)
    if overrides.get("tie_word_embeddings"):
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def test_bias_may_arrive_before_or_after_its_weight(tmp_path):
    model = tiny_llama(attention_bias=True)
    save_sharded(model, tmp_path)
    backwards = list(reversed(list(checkpoint_tensors(tmp_path))))  # every weight before its bias
    streamed = fill_quantized(empty_model(model.config), backwards)
    quantize_model(model)
    with torch.no_grad():
        assert torch.equal(streamed(TOKENS).logits, model(TOKENS).logits)


def test_read_safetensors_equals_the_safetensors_library(tmp_path):
    model = tiny_llama()
    model.to(torch.bfloat16)
    for shard in save_sharded(model, tmp_path):
        ours, theirs = dict(read_safetensors(shard)), load_file(shard)
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    loaded = load_quantized(tmp_path)  # bfloat16 on disk, float32 compute on the CPU
    assert loaded.model.embed_tokens.weight.dtype == torch.float32


def test_random_weights_from_a_config_or_a_known_name(monkeypatch):
    config = tiny_config()
    a, b, c = load_quantized(config, seed=0), load_quantized(config, seed=0), load_quantized(config, seed=1)
    with torch.no_grad():
        assert torch.equal(a(TOKENS).logits, b(TOKENS).logits)
        assert not torch.equal(a(TOKENS).logits, c(TOKENS).logits)
    std = a.model.embed_tokens.weight.std().item()
    assert abs(std - config.initializer_range) < 0.002 and torch.all(a.model.norm.weight == 1)
    monkeypatch.setitem(architectures.KNOWN, "tiny-test", TINY)
    named = load_quantized("tiny-test", seed=0)
    with torch.no_grad():
        assert torch.equal(named(TOKENS).logits, a(TOKENS).logits)


def test_clear_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_config().save_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no .safetensors files"):
        load_quantized(empty)
    full = tmp_path / "full"
    shards = save_sharded(tiny_llama(), full)
    shards[-1].unlink()
    with pytest.raises(ValueError, match=r"no tensor for .*missing in all.*missing shard"):
        load_quantized(full)
    with pytest.raises(ValueError, match="'lm_head', the output head"):
        load_quantized(tiny_config(), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="'llama-2-34b'.*not a known architecture"):
        load_quantized("llama-2-34b")
    wrong = tmp_path / "wrong"
    save_sharded(tiny_llama(), wrong)
    tiny_config(intermediate_size=160).save_pretrained(wrong)  # a config that does not match the weights
    with pytest.raises(ValueError, match=r"has shape .* expects .*do not match"):
        load_quantized(wrong)

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ValueError, match="cannot download 'someone/some-model'.*Offline"):
        load_quantized("someone/some-model")


def test_adalora_on_a_quantized_model_trains_and_merges():
    model = load_quantized(tiny_config(), seed=0)
    config = AdaLoRAConfig(target_modules=list(LLAMA_PROJECTIONS), init_r=4, target_r=2, total_steps=10)
    model, _ = add_adalora(model, config)
    adapters = [m for m in model.modules() if isinstance(m, SVDLinear)]
    assert len(adapters) == 14 and all(isinstance(m.base, NF4Linear) for m in adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(m.lam.abs().sum() > 0 for m in adapters), "the singular values moved away from 0"
    model.eval()
    with torch.no_grad():
        before = model(TOKENS).logits
        dequantize_model(model)
        for adapter in adapters:
            adapter.merge()
        torch.testing.assert_close(model(TOKENS).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
def test_cuda_load_quantizes_on_the_gpu_and_computes_in_bfloat16(tmp_path):
    model = tiny_llama()
    save_sharded(model, tmp_path)
    on_gpu = load_quantized(tmp_path, device="cuda")
    layer = on_gpu.model.layers[0].self_attn.q_proj
    assert layer.quantized.packed.is_cuda and layer.compute_dtype == torch.bfloat16
    config = AdaLoRAConfig(target_modules=list(LLAMA_PROJECTIONS), init_r=4, target_r=2, total_steps=10)
    on_gpu, _ = add_adalora(on_gpu, config)
    assert on_gpu.model.layers[0].self_attn.q_proj.P.is_cuda
    quantize_model(model, compute_dtype=torch.float32)
    with torch.no_grad():
        expected = model(TOKENS).logits
        got = on_gpu(TOKENS.cuda()).logits.float().cpu()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
