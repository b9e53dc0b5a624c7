"""minilora.double_quant: the dynamic map and the 8-bit quantizer against bitsandbytes (identical codes except where
bitsandbytes' CPU lookup is not nearest, and minilora never farther), and double quantization of NF4 constants
against quantize_4bit(..., compress_statistics=True)."""

import copy

import bitsandbytes.functional as bnbF
import pytest
import torch

from minilora.double_quant import (
    Blockwise8bit,
    dequantize_blockwise_8bit,
    dynamic_map,
    quantize_absmax,
    quantize_blockwise_8bit,
)
from minilora.nf4 import dequantize_nf4, quantize_nf4


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU fallback dequantizer in torch.compile; eager gives the same values, faster."""
    with torch._dynamo.config.patch(disable=True):
        yield


def distances(normalized, codes, signed):
    """|normalized value − map value of its code|, in float64 (exact for float32 operands this close)."""
    return (normalized.double() - dynamic_map(signed).double()[codes.long()]).abs()


def normalized_values(x, q):
    flat = x.reshape(-1).float()
    return flat / torch.repeat_interleave(q.absmax, q.blocksize)[: flat.numel()]


def compare_codes(ours, theirs, normalized, signed):
    """(number of differing codes); asserts that at every difference bitsandbytes' code is farther or a tie."""
    differ = ours != theirs
    d_ours, d_theirs = distances(normalized, ours, signed), distances(normalized, theirs, signed)
    assert not bool((d_ours > d_theirs).any()), "minilora is never farther"
    assert bool((d_theirs[differ] >= d_ours[differ]).all())
    return int(differ.sum())


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_the_bitsandbytes_map(signed):
    the_map = dynamic_map(signed)
    assert the_map.dtype == torch.float32 and the_map.numel() == 256 and the_map[-1] == 1
    assert torch.equal(the_map, the_map.sort().values)
    assert torch.equal(the_map, bnbF.create_dynamic_map(signed=signed))


def test_codes_are_exactly_nearest_with_ties_down():
    x = torch.randn(256 * 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-5, 1, 256 * 40)
    q = quantize_blockwise_8bit(x, 256)
    normalized = normalized_values(x, q).double()
    brute = (normalized[:, None] - dynamic_map(True).double()[None, :]).abs().argmin(dim=1)  # first min: ties down
    assert torch.equal(q.codes.long(), brute)
    midpoints = (dynamic_map(True)[:-1].double() + dynamic_map(True)[1:].double()) / 2
    on_midpoints = torch.cat([torch.tensor([1.0]), midpoints[midpoints.float().double() == midpoints].float()])
    codes = quantize_blockwise_8bit(on_midpoints, 4096).codes.long()[1:]
    expected = torch.nonzero(midpoints.float().double() == midpoints).squeeze(1)
    assert expected.numel() > 10, "enough midpoints are float32 numbers to test ties"
    assert torch.equal(codes, expected), "a value exactly between two map values takes the lower code"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_8bit_against_bitsandbytes(blocksize, dtype):
    generator = torch.Generator().manual_seed(blocksize)
    x = (torch.randn(50_000, generator=generator) * torch.logspace(-4, 1, 50_000)).to(dtype)
    theirs_codes, state = bnbF.quantize_blockwise(x, blocksize=blocksize)
    ours = quantize_blockwise_8bit(x, blocksize)
    assert torch.equal(ours.absmax, state.absmax)
    differ = compare_codes(ours.codes, theirs_codes, normalized_values(x, ours), signed=True)
    assert differ < 0.01 * x.numel()
    same = ours.codes == theirs_codes
    theirs_values = bnbF.dequantize_blockwise(theirs_codes, state)
    ours_values = dequantize_blockwise_8bit(ours)
    assert ours_values.dtype == dtype and theirs_values.dtype == dtype
    assert torch.equal(ours_values[same], theirs_values[same])


def test_unsigned_map_against_bitsandbytes():
    x = torch.rand(30_000, generator=torch.Generator().manual_seed(1)) ** 4
    unsigned_map = bnbF.create_dynamic_map(signed=False)
    theirs_codes, state = bnbF.quantize_blockwise(x, code=unsigned_map, blocksize=256)
    ours = quantize_blockwise_8bit(x, 256, signed=False)
    assert torch.equal(ours.absmax, state.absmax)
    compare_codes(ours.codes, theirs_codes, normalized_values(x, ours), signed=False)


def test_8bit_shapes_dtypes_zeros_and_nbytes():
    x = torch.randn(3, 7, 40, dtype=torch.bfloat16)
    q = quantize_blockwise_8bit(x, 64)
    assert isinstance(q, Blockwise8bit) and q.shape == x.shape and q.codes.dtype == torch.uint8
    assert q.absmax.numel() == -(-x.numel() // 64)
    assert q.nbytes == x.numel() + 4 * q.absmax.numel() + 256 * 4
    assert dequantize_blockwise_8bit(q).dtype == torch.bfloat16
    assert dequantize_blockwise_8bit(q, torch.float32).dtype == torch.float32
    assert torch.equal(dequantize_blockwise_8bit(quantize_blockwise_8bit(torch.zeros(600))), torch.zeros(600))


def bnb_double(w, blocksize):
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    return packed.view(-1), state


@pytest.mark.parametrize("shape, blocksize", [((1024, 1024), 64), ((333, 517), 64), ((4096, 300), 32),
                                              ((70, 4096), 4096), ((100_001,), 128)])
def test_double_quantization_against_bitsandbytes(shape, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    packed, state = bnb_double(w, blocksize)
    q = quantize_nf4(w, blocksize, double_quant=True)
    assert q.double_quant and torch.equal(q.packed, packed)
    assert torch.equal(q.absmax8.offset, state.offset)
    assert torch.equal(q.absmax8.quantized.absmax, state.state2.absmax)
    plain = quantize_nf4(w, blocksize).absmax
    normalized = normalized_values(plain - state.offset, q.absmax8.quantized)
    differ = compare_codes(q.absmax8.quantized.codes, state.absmax, normalized, signed=True)
    assert differ <= max(2, 0.01 * plain.numel())
    same = q.absmax8.quantized.codes == state.absmax
    constants_theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(q.absmax[same], constants_theirs[same])
    assert (q.absmax - constants_theirs).abs().max() < 0.02 * plain.mean()
    flat = copy.copy(state)
    flat.shape = torch.Size([w.numel()])  # see tests/test_nf4.py: bitsandbytes' AVX-512 kernel, one row
    in_same_block = same[torch.arange(w.numel()) // blocksize]
    ours_values = dequantize_nf4(q).reshape(-1)
    theirs_values = bnbF.dequantize_4bit(packed, flat).reshape(-1)
    assert torch.equal(ours_values[in_same_block], theirs_values[in_same_block])


def test_double_quantization_bits_per_parameter_and_nbytes():
    q = quantize_nf4(torch.zeros(4096, 4096), 64, double_quant=True)
    blocks = 4096 * 4096 // 64
    assert q.nbytes == 4096 * 4096 // 2 + 16 * 4 + blocks + 4 * (blocks // 256) + 4 + 256 * 4
    assert f"{8 * q.nbytes / q.shape.numel():.3f}" == "4.127"
    assert q.absmax.dtype == torch.float32 and q.absmax.numel() == blocks


def test_double_quantization_of_constant_and_zero_tensors():
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(5, 300), double_quant=True)), torch.zeros(5, 300))
    ones = torch.full((4, 256), 0.5)
    restored = dequantize_nf4(quantize_nf4(ones, double_quant=True))
    assert torch.equal(restored, ones), "every constant equals the offset: codes 0 and exact values"


def test_quantize_absmax_is_offset_plus_8bit_codes():
    constants = quantize_nf4(torch.randn(256, 512, generator=torch.Generator().manual_seed(5))).absmax
    dq = quantize_absmax(constants)
    assert dq.offset == constants.mean() and dq.quantized.blocksize == 256 and dq.quantized.signed
    assert torch.equal(dq.dequantize(), dequantize_blockwise_8bit(dq.quantized, torch.float32) + dq.offset)
    assert dq.nbytes == constants.numel() + 4 * -(-constants.numel() // 256) + 256 * 4 + 4


def test_8bit_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"NaN or inf value\(s\), the first at flat index 2"):
        quantize_blockwise_8bit(torch.tensor([1.0, 2.0, float("nan")]))
    with pytest.raises(ValueError, match=r"signed=False\) needs values >= 0, got a minimum of -3"):
        quantize_blockwise_8bit(torch.tensor([1.0, -3.0]), signed=False)
    with pytest.raises(ValueError, match=r"blocksize 48 is not supported"):
        quantize_blockwise_8bit(torch.randn(100), 48)
    with pytest.raises(TypeError, match=r"got torch\.int32"):
        quantize_blockwise_8bit(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"empty tensor"):
        quantize_blockwise_8bit(torch.zeros(0))
    with pytest.raises(TypeError, match=r"expects the Blockwise8bit returned by quantize_blockwise_8bit, got NF4Ten"):
        dequantize_blockwise_8bit(quantize_nf4(torch.randn(64)))
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16, not torch\.int8"):
        dequantize_blockwise_8bit(quantize_blockwise_8bit(torch.randn(8)), torch.int8)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("inf")]), double_quant=True)
