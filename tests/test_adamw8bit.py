"""AdamW8bit: the plain dequantize-update-quantize step (the notebook's readable version), the storing error bound,
the small-tensor rule, state_dict round trips, bad inputs, and agreement with bitsandbytes' AdamW8bit on the CPU."""

import io
import logging

import pytest
import torch

from minilora.adamw8bit import BLOCKSIZE, MIN_8BIT_SIZE, AdamW8bit, dequantize_moment
from minilora.double_quant import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit
from minilora.paged_optim import adamw_update_

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def gradients(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * (0.1 + torch.rand(shape, generator=generator))
            for _ in range(steps)]


def plain_run(theta, grads):
    """Notebook 07's readable version: dequantize m and v, AdamW in float32, quantize again (256, signed/unsigned)."""
    theta = theta.clone()
    zeros = torch.zeros(theta.shape)
    m, v = quantize_blockwise_8bit(zeros, 256, signed=True), quantize_blockwise_8bit(zeros, 256, signed=False)
    for t, g in enumerate(grads, start=1):
        m_float, v_float = dequantize_blockwise_8bit(m), dequantize_blockwise_8bit(v)
        adamw_update_(theta, g, m_float, v_float, float(t), HYPER["lr"], *HYPER["betas"], HYPER["eps"],
                      HYPER["weight_decay"])
        m, v = quantize_blockwise_8bit(m_float, 256, signed=True), quantize_blockwise_8bit(v_float, 256, signed=False)
    return theta, m, v


def run(optimizer, params, grads_per_param):
    for grads in zip(*grads_per_param, strict=True):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(64, 128), (5000,), (3, 1500)])  # whole blocks; a partial last block; a matrix
def test_equals_the_plain_version(shape):
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 12)
    theta, m, v = plain_run(start, grads)
    param = torch.nn.Parameter(start.clone())
    optimizer = AdamW8bit([param], **HYPER)
    run(optimizer, [param], [grads])
    state = optimizer.state[param]
    assert torch.equal(param.detach(), theta)
    assert torch.equal(state["exp_avg_codes"], m.codes) and torch.equal(state["exp_avg_absmax"], m.absmax)
    assert torch.equal(state["exp_avg_sq_codes"], v.codes) and torch.equal(state["exp_avg_sq_absmax"], v.absmax)
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == shape
    assert state["exp_avg_absmax"].shape == (-(-start.numel() // BLOCKSIZE),)
    assert state["step"].item() == 12


def test_storing_error_is_within_half_a_map_gap():
    """After one step from zero, each stored moment is the float32 moment to within half the widest gap of its map
    times its block's absmax (plus float32 rounding), and v's map is the unsigned one."""
    shape, (g,) = (4096 * 2,), gradients((4096 * 2,), 1)
    param = torch.nn.Parameter(torch.randn(shape))
    optimizer = AdamW8bit([param], **HYPER)
    run(optimizer, [param], [[g]])
    beta1, beta2 = HYPER["betas"]
    exact = {"exp_avg": (1 - beta1) * g, "exp_avg_sq": (1 - beta2) * g * g}
    state = optimizer.state[param]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        stored = dequantize_moment(state[key + "_codes"], state[key + "_absmax"], signed)
        half_gap = dynamic_map(signed).diff().max().item() / 2
        absmax = state[key + "_absmax"].repeat_interleave(BLOCKSIZE)
        assert ((stored - exact[key]).abs() <= (half_gap + 1e-6) * absmax).all(), key
        assert ((stored - exact[key]).norm() / exact[key].norm()).item() < 0.02
    assert bool((dequantize_moment(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False) >= 0).all())


def test_fresh_states_are_exact_zeros():
    param = torch.nn.Parameter(torch.randn(MIN_8BIT_SIZE))
    optimizer = AdamW8bit([param], **HYPER)
    state = optimizer._fresh_state(param)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        assert torch.equal(dequantize_moment(state[key + "_codes"], state[key + "_absmax"], signed),
                           torch.zeros(MIN_8BIT_SIZE))


def test_small_tensors_keep_float32_states_and_torchs_bits():
    shapes = [(MIN_8BIT_SIZE - 1,), (MIN_8BIT_SIZE,), (7,), (64, 64)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [gradients(s, 6, seed=10 + i) for i, s in enumerate(shapes)]
    ours, theirs = [torch.nn.Parameter(s.clone()) for s in starts], [torch.nn.Parameter(s.clone()) for s in starts]
    optimizer = AdamW8bit(ours, **HYPER)
    run(optimizer, ours, grads)
    run(torch.optim.AdamW(theirs, **HYPER), theirs, grads)
    for p, q in zip(ours, theirs, strict=True):
        state = optimizer.state[p]
        if p.numel() < MIN_8BIT_SIZE:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
            assert torch.equal(p, q)
        else:
            assert state["exp_avg_codes"].dtype == torch.uint8
            assert (p - q).abs().max().item() < 0.1 * HYPER["lr"] * 6  # close to AdamW, not equal
    assert optimizer.state_bytes() == 8 * (MIN_8BIT_SIZE - 1 + 7) + 2 * 2 * (MIN_8BIT_SIZE + 4 * 16)


def test_min_8bit_size_chooses_the_threshold():
    param = torch.nn.Parameter(torch.randn(300))
    optimizer = AdamW8bit([param], min_8bit_size=256)
    run(optimizer, [param], [gradients((300,), 1)])
    assert optimizer.state[param]["exp_avg_absmax"].shape == (2,)


def test_state_dict_round_trip_through_bytes():
    shapes = [(70, 100), (5,), (4096,)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [gradients(s, 10, seed=20 + i) for i, s in enumerate(shapes)]
    straight = [torch.nn.Parameter(s.clone()) for s in starts]
    run(AdamW8bit(straight, **HYPER), straight, grads)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    first = AdamW8bit(params, **HYPER)
    run(first, params, [g[:4] for g in grads])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = AdamW8bit(params, **HYPER)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for p in params:
        for key, value in first.state[p].items():
            assert value.dtype == second.state[p][key].dtype and torch.equal(value, second.state[p][key]), key
    run(second, params, [g[4:] for g in grads])
    assert all(torch.equal(p, q) for p, q in zip(params, straight, strict=True))


def test_float64_parameters_with_float32_states():
    param = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    optimizer = AdamW8bit([param], **HYPER)
    run(optimizer, [param], [[g.double() for g in gradients((5000,), 3)]])
    assert param.dtype == torch.float64 and optimizer.state[param]["exp_avg_absmax"].dtype == torch.float32
    # load_state_dict must not cast the codes or constants to the parameter's dtype, as torch's would
    reloaded = AdamW8bit([param], **HYPER)
    reloaded.load_state_dict(optimizer.state_dict())
    assert reloaded.state[param]["exp_avg_codes"].dtype == torch.uint8
    assert reloaded.state[param]["exp_avg_sq_absmax"].dtype == torch.float32


def test_loads_torch_adamw_state_for_small_tensors():
    param = torch.nn.Parameter(torch.randn(100))
    torch_optimizer = torch.optim.AdamW([param], **HYPER)
    run(torch_optimizer, [param], [gradients((100,), 2)])
    ours = AdamW8bit([param], **HYPER)
    ours.load_state_dict(torch_optimizer.state_dict())
    assert torch.equal(ours.state[param]["exp_avg_sq"], torch_optimizer.state[param]["exp_avg_sq"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "lr must be"),
    (dict(betas=(0.9, 1.0)), "betas must be"),
    (dict(min_8bit_size=0), "min_8bit_size must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW8bit([torch.nn.Parameter(torch.zeros(10))], **kwargs)


def test_bad_state_dicts():
    param = torch.nn.Parameter(torch.randn(5000))
    optimizer = AdamW8bit([param], **HYPER)
    run(optimizer, [param], [gradients((5000,), 1)])
    saved = optimizer.state_dict()
    float32_states = AdamW8bit([param], min_8bit_size=10_000)  # expects float32 states for this parameter
    with pytest.raises(ValueError, match="needs the keys"):
        float32_states.load_state_dict(saved)
    other_shape = AdamW8bit([torch.nn.Parameter(torch.randn(100, 50))])
    with pytest.raises(ValueError, match="has shape"):
        other_shape.load_state_dict(saved)


def bitsandbytes_adamw8bit_or_skip():
    """bitsandbytes' AdamW8bit class, if its CPU path runs here (0.50 has one); skip the test otherwise."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb = pytest.importorskip("bitsandbytes")
    probe = torch.nn.Parameter(torch.randn(MIN_8BIT_SIZE))
    try:
        optimizer = bnb.optim.AdamW8bit([probe])
        probe.grad = torch.randn(MIN_8BIT_SIZE)
        optimizer.step()
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no 8-bit AdamW on this CPU: {error}")
    return bnb


def test_agrees_with_bitsandbytes_one_step_at_a_time():
    """From the same state: same maps, block constants of v, 8-bit/32-bit choice and weights (to float32 rounding);
    codes differ only where bitsandbytes' lookup-table quantizer is not nearest (ours never farther for v)."""
    bnb = bitsandbytes_adamw8bit_or_skip()
    shapes = [(256, 256), (1000,)]
    starts = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [gradients(s, 12, seed=30 + i) for i, s in enumerate(shapes)]
    ours, theirs = [torch.nn.Parameter(s.clone()) for s in starts], [torch.nn.Parameter(s.clone()) for s in starts]
    mine, its = AdamW8bit(ours, **HYPER), bnb.optim.AdamW8bit(theirs, **HYPER)
    beta2 = HYPER["betas"][1]
    values = dynamic_map(False).double()
    for step, step_grads in enumerate(zip(*grads, strict=True)):
        if step:
            a, b = mine.state[ours[0]], its.state[theirs[0]]
            for key, their_key in (("exp_avg_codes", "state1"), ("exp_avg_absmax", "absmax1"),
                                   ("exp_avg_sq_codes", "state2"), ("exp_avg_sq_absmax", "absmax2")):
                a[key] = b[their_key].clone()
            with torch.no_grad():
                ours[0].copy_(theirs[0])
            v_before = dequantize_moment(b["state2"], b["absmax2"], False)
        else:
            v_before = torch.zeros(shapes[0])
        v_new = v_before.mul(beta2).addcmul_(step_grads[0], step_grads[0], value=1 - beta2)
        for p, q, g in zip(ours, theirs, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        its.step()
        a, b = mine.state[ours[0]], its.state[theirs[0]]
        assert torch.equal(dynamic_map(True), b["qmap1"]) and torch.equal(dynamic_map(False), b["qmap2"])
        assert torch.equal(a["exp_avg_sq_absmax"], b["absmax2"])
        assert (a["exp_avg_codes"] != b["state1"]).double().mean().item() < 0.005
        assert (a["exp_avg_sq_codes"] != b["state2"]).double().mean().item() < 0.1
        normalized = (v_new.view(-1, BLOCKSIZE) / b["absmax2"][:, None]).reshape(-1).double()
        distance = [(values[codes.reshape(-1).long()] - normalized).abs()
                    for codes in (a["exp_avg_sq_codes"], b["state2"])]
        assert bool((distance[0] <= distance[1]).all()), "our v code is never farther than bitsandbytes'"
        assert (ours[0] - theirs[0]).abs().max().item() < 1e-6
        assert (ours[1] - theirs[1]).abs().max().item() < 1e-6
    assert its.state[theirs[1]]["state1"].dtype == torch.float32 and "exp_avg" in mine.state[ours[1]]
