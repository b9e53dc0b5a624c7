"""minilora.nf4 against bitsandbytes' CPU path (quantize_4bit / dequantize_4bit, "nf4"), bit for bit, plus the
edge cases and the errors a learner can hit."""

import copy
import dataclasses
import re
from contextlib import contextmanager

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minilora.nf4 import (
    BLOCKSIZES,
    CHUNK,
    DECODE_CHUNK,
    HUGE_PAGE,
    NF4Tensor,
    dequantize_nf4,
    empty_on_huge_pages,
    map_blocks,
    nf4_code_rule,
    nf4_codes,
    nf4_midpoints,
    nf4_table,
    quantize_nf4,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU fallback dequantizer in torch.compile (one compilation per shape); eager gives the
    same values without minutes of compiling."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, blocksize):
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    return packed.view(-1), state


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit, asked for the flattened tensor and reshaped. Its AVX-512 kernel reads the
    constants row by row, which is wrong when the last dimension is not a multiple of the block size (notebook 05
    shows it); a single row is read correctly by every one of its code paths."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbF.dequantize_4bit(packed, flat).reshape(state.shape)


def assert_identical_to_bnb(w, blocksize):
    packed, state = bnb_quantize(w, blocksize)
    q = quantize_nf4(w, blocksize)
    assert torch.equal(q.packed, packed), "packed codes"
    assert torch.equal(q.absmax, state.absmax), "absmax constants"
    ours = dequantize_nf4(q)
    assert ours.shape == w.shape and ours.dtype == w.dtype
    assert torch.equal(ours, bnb_dequantize(packed, state)), "dequantized values"
    return q


def random_shapes(generator, blocksize, count=4):
    """Shapes with partial last blocks, odd counts, 1 to 3 dimensions, up to a few blocks of the largest size."""
    shapes = [(3 * blocksize + 1,), (blocksize - 1,), (1,)]
    for _ in range(count):
        ndim = int(torch.randint(1, 4, (1,), generator=generator))
        top = max(2, int(round((6 * blocksize) ** (1 / ndim))) + 3)
        shapes.append(tuple(int(s) for s in torch.randint(1, top, (ndim,), generator=generator)))
    return shapes


def test_table_is_the_bitsandbytes_table():
    table = nf4_table()
    assert table.dtype == torch.float32 and table.numel() == 16
    assert torch.equal(table, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(table, table.sort().values) and table[0] == -1 and table[7] == 0 and table[-1] == 1


def test_code_rule_is_nearest_level_and_ties_go_down():
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    table = nf4_table()
    assert torch.equal(nf4_code_rule(x), (x[:, None] - table[None, :]).abs().argmin(dim=1))
    mid = nf4_midpoints(torch.device("cpu"))
    assert torch.equal(nf4_code_rule(mid), torch.arange(15))
    assert torch.equal(nf4_code_rule(torch.nextafter(mid, torch.tensor(2.0))), torch.arange(1, 16))


def test_fast_codes_equal_the_rule_on_every_number_where_they_could_differ():
    """The lookup is exact by monotonicity in every cell without a midpoint; the 15 cells with one are checked
    exhaustively (all 2**16 float32 numbers of each), plus special values."""
    mid = nf4_midpoints(torch.device("cpu"))
    tops = torch.unique(mid.view(torch.int32) >> 16)
    assert tops.numel() == 15
    every = (tops[:, None] << 16 | torch.arange(2**16, dtype=torch.int32)).view(torch.float32).reshape(-1)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0000001, -1.0000001, 0.5, -0.5])
    random = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    for values in (every, special, random):
        assert torch.equal(nf4_codes(values), nf4_code_rule(values).to(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bit_exact_with_bitsandbytes_on_random_shapes(blocksize, dtype):
    generator = torch.Generator().manual_seed(blocksize + DTYPES.index(dtype))
    for shape in random_shapes(generator, blocksize):
        scale = 10 ** float(torch.randn(1, generator=generator))
        w = (torch.randn(shape, generator=generator) * scale).to(dtype)
        assert_identical_to_bnb(w, blocksize)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_all_zero_blocks_full_and_partial(blocksize):
    w = torch.randn(5 * blocksize + 7)
    w[blocksize : 2 * blocksize] = 0  # a complete all-zero block: absmax 0
    w[5 * blocksize :] = 0  # an all-zero final partial block: absmax floored to 1e-38, as bitsandbytes stores it
    q = assert_identical_to_bnb(w, blocksize)
    assert q.absmax[1] == 0 and q.absmax[-1] == torch.tensor(1e-38)
    restored = dequantize_nf4(q)
    assert torch.equal(restored[blocksize : 2 * blocksize], torch.zeros(blocksize))
    assert torch.equal(restored[5 * blocksize :], torch.zeros(7))
    assert torch.equal(dequantize_nf4(quantize_nf4(torch.zeros(3, 100))), torch.zeros(3, 100))


def test_extreme_magnitudes_and_signed_zeros():
    generator = torch.Generator().manual_seed(2)
    for scale in (1e-42, 1e-39, 1e-20, 1e20, 1e37):
        assert_identical_to_bnb(torch.randn(1000, generator=generator) * scale, 64)
    mixed = torch.randn(64 * 9, generator=generator) * torch.logspace(-30, 30, 64 * 9)
    mixed[::5] = -0.0
    assert_identical_to_bnb(mixed, 64)


def test_values_exactly_on_midpoints_take_the_lower_code_like_bitsandbytes():
    mid = nf4_midpoints(torch.device("cpu"))
    block = torch.cat([torch.tensor([1.0]), mid, -mid, torch.nextafter(mid, torch.tensor(2.0)), torch.zeros(18)])
    q = assert_identical_to_bnb(block, 64)  # absmax 1: the scaled values are the values themselves
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1).long()
    assert torch.equal(codes[1:16], torch.arange(15))


def test_large_matrix_through_many_chunks_and_threads():
    w = torch.randn(1024, 1536, generator=torch.Generator().manual_seed(3))
    assert_identical_to_bnb(w, 64)
    assert_identical_to_bnb(w.to(torch.bfloat16), 256)


def test_non_contiguous_and_parameter_inputs():
    w = torch.randn(96, 130, generator=torch.Generator().manual_seed(4))
    assert_identical_to_bnb(w.t(), 64)
    parameter = torch.nn.Parameter(w.clone())
    assert torch.equal(quantize_nf4(parameter).packed, quantize_nf4(w).packed)


def test_the_output_on_huge_pages_is_an_ordinary_tensor():
    """empty_on_huge_pages only advises the kernel: any size gives an ordinary tensor that owns its memory and can
    grow (a tensor over memory mapped by hand, with torch.frombuffer, could not)."""
    for numel in (0, 5, HUGE_PAGE // 4 + 3, 3 * HUGE_PAGE // 4):
        out = empty_on_huge_pages(numel, torch.float32, torch.device("cpu"))
        assert out.shape == (numel,) and out.dtype == torch.float32 and out.is_contiguous()
        out.fill_(1.5)
        assert out.sum().item() == 1.5 * numel
        out.resize_(numel + 7)


def smaps_field(address, field):
    """A field of /proc/self/smaps for the mapping that holds address (None where the kernel does not list it)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if not head.endswith(":"):  # a mapping's first line: start-end in hexadecimal
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == field + ":":
                return line.split()[1]
    return None


def test_the_advice_reaches_the_kernel_where_huge_pages_are_on():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            mode = setting.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system (not Linux, or not built in)")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are switched off on this system")
    # 40 MiB each, above glibc's largest mmap threshold (32 MiB): both come straight from the operating system, never
    # from heap memory an earlier test's output may have advised already
    ours = empty_on_huge_pages(10 * 2**20, torch.float32, torch.device("cpu"))
    plain = torch.empty(10 * 2**20, dtype=torch.float32)
    ours_eligible, plain_eligible = (smaps_field(-(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE, "THPeligible")
                                     for tensor in (ours, plain))
    if ours_eligible is None and plain_eligible is None:
        pytest.skip("this kernel's /proc/self/smaps has no THPeligible field (Linux before 5.0)")
    assert ours_eligible == "1"
    if "[madvise]" in mode:  # then only advised memory may get huge pages: the plain tensor's may not
        assert plain_eligible == "0"


def test_dequantize_keeps_shape_and_dtype_unless_told():
    w = torch.randn(2, 3, 50, dtype=torch.float16)
    q = quantize_nf4(w, 32)
    assert isinstance(q, NF4Tensor) and q.shape == w.shape and q.dtype == torch.float16 and q.blocksize == 32
    assert dequantize_nf4(q).dtype == torch.float16 and dequantize_nf4(q).shape == (2, 3, 50)
    as_float = dequantize_nf4(q, torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float.to(torch.float16), dequantize_nf4(q)), "float32 product, rounded once"
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), as_float.to(torch.bfloat16))


def test_nbytes_counts_codes_constants_and_tables():
    for n in (1, 63, 64, 1001):
        q = quantize_nf4(torch.randn(n))
        blocks = -(-n // 64)
        assert q.packed.numel() == (n + 1) // 2 and q.absmax.numel() == blocks
        assert q.nbytes == (n + 1) // 2 + 4 * blocks + 16 * 4
    q = quantize_nf4(torch.zeros(4096, 4096))
    assert f"{8 * q.nbytes / q.shape.numel():.3f}" == "4.500"


def test_quantize_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"1 NaN or inf value\(s\), the first at flat index 70"):
        quantize_nf4(torch.cat([torch.randn(70), torch.tensor([float("nan")]), torch.randn(100)]))
    with pytest.raises(ValueError, match=r"2 NaN or inf value\(s\), the first at flat index 3"):
        quantize_nf4(torch.tensor([1.0, 2.0, 3.0, float("inf"), -float("inf")]))  # in the partial block
    with pytest.raises(ValueError, match=r"empty tensor \(shape \(0, 5\)\)"):
        quantize_nf4(torch.zeros(0, 5))
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16 tensors, got torch\.int64"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(TypeError, match=r"got torch\.float64"):
        quantize_nf4(torch.randn(10, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got list"):
        quantize_nf4([1.0, 2.0])
    for blocksize in (48, 8192, 0):
        with pytest.raises(ValueError, match=rf"blocksize {blocksize} is not supported: use one of 32, 64"):
            quantize_nf4(torch.randn(100), blocksize)


def test_dequantize_errors_say_what_was_wrong():
    with pytest.raises(TypeError, match=r"expects the NF4Tensor returned by quantize_nf4, got Tensor"):
        dequantize_nf4(torch.randn(4))
    packed, _ = bnb_quantize(torch.randn(64), 64)
    with pytest.raises(TypeError, match=r"got Tensor"):
        dequantize_nf4(packed)
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16, not torch\.int32"):
        dequantize_nf4(quantize_nf4(torch.randn(8)), torch.int32)


def tampered(q, **changes):
    return dataclasses.replace(q, **changes)  # NF4Tensor is frozen: this is how its parts get swapped


def test_parts_that_do_not_fit_together_are_refused_before_dequantizing():
    """Each of these used to dequantize to a tensor of the right shape and wrong values, without a word."""
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    q, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    other = quantize_nf4(torch.randn(20, 64), double_quant=True)
    cases = [  # (tampered tensor, part, entries found, entries expected, shape, blocksize)
        (tampered(q, packed=q.packed[:-32]), "packed", 288, 320, 10, 64),
        (tampered(q, packed=q.packed[:-1]), "packed", 319, 320, 10, 64),
        (tampered(q, shape=torch.Size([5, 64])), "packed", 320, 160, 5, 64),
        (tampered(q, blocksize=128), "absmax32", 10, 5, 10, 128),
        (tampered(q, absmax32=torch.cat([q.absmax32, q.absmax32])), "absmax32", 20, 10, 10, 64),
        (tampered(q, absmax32=q.absmax32[:-1]), "absmax32", 9, 10, 10, 64),
        (tampered(dq, absmax8=other.absmax8), "absmax8.quantized.codes", 20, 10, 10, 64),
        (tampered(dq, blocksize=128), "absmax8.quantized.codes", 10, 5, 10, 128),
    ]
    for bad, part, found, expected, rows, blocksize in cases:
        match = (rf"^NF4Tensor\.{re.escape(part)} has {found} entries, expected {expected} for shape \({rows}, 64\) "
                 rf"and blocksize {blocksize}: its parts do not fit together; quantize the tensor again with "
                 r"quantize_nf4$")
        with pytest.raises(ValueError, match=match):
            dequantize_nf4(bad)
    with pytest.raises(ValueError, match=r"^NF4Tensor\.blocksize is 48, expected one of 32, 64, .*, 4096: quantize"):
        dequantize_nf4(tampered(q, blocksize=48))


def test_parts_that_fit_still_dequantize():
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))
    for q in (quantize_nf4(w), quantize_nf4(w, double_quant=True)):  # a reshape keeps every part's size
        assert torch.equal(dequantize_nf4(tampered(q, shape=torch.Size([640]))), dequantize_nf4(q).view(-1))
    for n in (1, 2, 63, 65, 4097):  # odd counts (a padding nibble) and partial blocks, with every block size
        for blocksize in BLOCKSIZES:
            w = torch.randn(n)
            assert_identical_to_bnb(w, blocksize)
            assert (dequantize_nf4(quantize_nf4(w, blocksize, double_quant=True)) - w).abs().max() <= w.abs().max()


def assert_paths_identical(w, blocksize, double_quant):
    """The vectorized path (one range, what a GPU runs) gives the chunked path's bytes, constants and values."""
    chunked = quantize_nf4(w, blocksize, double_quant, vectorized=False)
    whole = quantize_nf4(w, blocksize, double_quant, vectorized=True)
    assert torch.equal(whole.packed, chunked.packed), "packed codes"
    assert torch.equal(whole.absmax, chunked.absmax), "absmax constants"
    if double_quant:
        assert torch.equal(whole.absmax8.quantized.codes, chunked.absmax8.quantized.codes), "8-bit constants"
        assert torch.equal(whole.absmax8.offset, chunked.absmax8.offset), "offset"
    for dtype in DTYPES:
        expected = dequantize_nf4(chunked, dtype, vectorized=False)
        assert expected.shape == w.shape and expected.dtype == dtype
        assert torch.equal(dequantize_nf4(chunked, dtype, vectorized=True), expected), f"dequantized to {dtype}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_vectorized_and_chunked_paths_give_the_same_bits(blocksize, dtype, double_quant):
    generator = torch.Generator().manual_seed(blocksize + DTYPES.index(dtype))
    several_chunks = (3 * CHUNK + blocksize // 2 + 1,)  # several chunks (on threads), a partial block, an odd count
    several_decode_chunks = (2 * DECODE_CHUNK + 3 * blocksize + 1,)
    for shape in [*random_shapes(generator, blocksize), several_chunks, several_decode_chunks]:
        scale = 10 ** float(torch.randn(1, generator=generator))
        w = (torch.randn(shape, generator=generator) * scale).to(dtype)
        assert_paths_identical(w, blocksize, double_quant)
    w = torch.randn(5 * blocksize + 7, generator=generator).to(dtype)
    w[blocksize : 2 * blocksize] = 0  # an all-zero complete block (absmax 0) and an all-zero partial one (1e-38)
    w[5 * blocksize :] = 0
    assert_paths_identical(w, blocksize, double_quant)


def test_by_default_only_the_cpu_is_chunked():
    def ranges(device, vectorized=None):
        calls = []
        map_blocks(2000, 64, lambda first, last: calls.append((first, last)), torch.device(device), vectorized)
        return sorted(calls)

    step = CHUNK // 64
    chunks = [(first, min(first + step, 2000)) for first in range(0, 2000, step)]
    assert ranges("cpu") == chunks and len(chunks) == 4
    assert ranges("cuda") == ranges("mps") == ranges("cpu", vectorized=True) == [(0, 2000)]
    assert ranges("cuda", vectorized=False) == chunks


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active (on this thread: a worker thread has no mode)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def one_thread():
    """The chunked path runs its chunks on the calling thread only when torch has one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def counted(fn, *args, **kwargs):
    """(aten operations that fn(*args, **kwargs) dispatched, its result)."""
    with CountOps() as ops:
        result = fn(*args, **kwargs)
    return ops.count, result


OPS_BOUND = 100  # measured: 58 to quantize, 84 with double quantization; 22 and 34 to dequantize (float32; +2 bf16)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vectorized_path_dispatches_a_few_operations_whatever_the_size(dtype, double_quant):
    """On a GPU every aten operation that computes (not a view or a slice) is a kernel launch. The vectorized path
    dispatches the same few at any size; the chunked path about 24 more per chunk to quantize, 15 to dequantize."""
    generator = torch.Generator().manual_seed(6)
    small = torch.randn(257, 511, generator=generator).to(dtype)  # 131,327 values: 5 chunks, a partial block, odd
    big = torch.randn(8 * 257, 4 * 511, generator=generator).to(dtype)  # 32 times as many: 129 chunks (9 to decode)
    dequantize_nf4(quantize_nf4(small, double_quant=double_quant))  # builds the cached tables before counting
    counts = {}
    with one_thread():
        for vectorized in (True, False):
            for name, w in (("small", small), ("big", big)):
                n_quantize, q = counted(quantize_nf4, w, double_quant=double_quant, vectorized=vectorized)
                n_dequantize, _ = counted(dequantize_nf4, q, vectorized=vectorized)
                counts[vectorized, name] = n_quantize, n_dequantize
    assert counts[True, "small"] == counts[True, "big"], counts
    assert max(counts[True, "big"]) <= OPS_BOUND, counts
    (quantize_small, dequantize_small), (quantize_big, dequantize_big) = counts[False, "small"], counts[False, "big"]
    assert quantize_big > 8 * quantize_small, counts  # the chunked count grows with the chunks: 5 -> 129
    assert dequantize_big > 3 * dequantize_small, counts  # DECODE_CHUNK's larger chunks: 1 -> 9
    assert min(counts[False, "big"]) > OPS_BOUND, counts


def test_compiled_dequantize_traces_one_graph_and_gives_the_same_bits():
    """compiled= hands nf4_values to torch.compile whole (fullgraph=True: a break back into Python would raise). The
    backend here records each graph and runs it as traced, where inductor would generate its kernel from it; the GPU
    check (bench/gpu_check.py --device cuda) compiles it with inductor and compares the values again."""
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    generator = torch.Generator().manual_seed(11)
    with torch._dynamo.config.patch(disable=False):  # this file's fixture turns compilation off for bitsandbytes
        for shape, blocksize in (((96, 64), 64), ((33, 70), 64), ((4097,), 128)):  # then a partial block, odd count
            for double_quant in (False, True):
                q = quantize_nf4(torch.randn(shape, generator=generator), blocksize, double_quant)
                for dtype in DTYPES:
                    compiled = dequantize_nf4(q, dtype, compiled=recording)
                    assert compiled.shape == q.shape and compiled.dtype == dtype
                    assert torch.equal(compiled, dequantize_nf4(q, dtype)), (shape, double_quant, dtype)
    assert 1 <= len(graphs) <= len(DTYPES), f"{len(graphs)} graphs: dynamic shapes should need one per dtype"
    for graph in graphs:  # one graph holds the whole expression: the gather, the multiplication and the cast
        calls = [node for node in graph.graph.nodes if node.op in ("call_function", "call_method")]
        targets = " ".join(str(node.target) for node in calls)
        assert "getitem" in targets and "mul" in targets and "to" in targets, targets
