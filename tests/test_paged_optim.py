"""PagedAdamW against torch.optim.AdamW (the oracle), its paging statistics, state_dict, and bad inputs."""

import io

import pytest
import torch

from minilora.paged_optim import PagedAdamW, Pager

PAGE = 256  # bytes: 64 float32 elements per page, so small tensors already span many pages
# One smaller than a page, one spanning many pages and not a multiple of it, a matrix, and one that never gets a grad.
SHAPES = [(3,), (1000,), (40, 7), (5,)]
PAGES_PER_STATE = 1 + 16 + 5 + 1
HYPER = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6)


def make_params(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]


def groups(params):
    """Two groups with different weight decay (one without); the last parameter never gets a gradient."""
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}]


def set_grads(step, *param_lists):
    generator = torch.Generator().manual_seed(1000 + step)
    for i, shape in enumerate(SHAPES[:-1]):
        grad = torch.randn(shape, generator=generator)
        for params in param_lists:
            params[i].grad = grad.to(params[i])  # its dtype and device


def train(optimizers_and_params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(step, *(params for _, params in optimizers_and_params))
        for optimizer, _ in optimizers_and_params:
            optimizer.step()


def max_difference(a, b):
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b, strict=True))


def assert_states_equal(paged, reference, tol=1e-6):
    ours, theirs = paged.state_dict()["state"], reference.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        assert ours[index]["step"].item() == theirs[index]["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours[index][key].shape == theirs[index][key].shape
            assert (ours[index][key] - theirs[index][key]).abs().max().item() <= tol


def assert_stats_consistent(optimizer, budget_bytes):
    stats = optimizer.stats
    assert stats.bytes_moved == (stats.page_ins + stats.page_outs) * PAGE
    assert stats.resident_bytes <= stats.peak_resident_bytes <= budget_bytes
    assert stats.prefetches <= stats.page_ins and stats.evictions <= stats.page_ins


@pytest.mark.parametrize("budget_pages", [None, PAGES_PER_STATE, 4, 2], ids=["all", "half", "4 pages", "2 pages"])
def test_equals_torch_adamw_after_100_steps(budget_pages):
    params, reference_params = make_params(), make_params()
    resident = None if budget_pages is None else budget_pages * PAGE
    paged = PagedAdamW(groups(params), **HYPER, weight_decay=0.5, page_bytes=PAGE, resident_bytes=resident)
    reference = torch.optim.AdamW(groups(reference_params), **HYPER, weight_decay=0.5)
    train([(paged, params), (reference, reference_params)], 100)

    assert max_difference(params, reference_params) <= 1e-6
    assert torch.equal(params[-1], make_params()[-1]), "a parameter whose grad is None is not touched"
    assert params[-1] not in paged.state, "and gets no state, as in torch"
    budget = 2 * PAGES_PER_STATE * PAGE if resident is None else resident
    assert_stats_consistent(paged, budget)
    stats = paged.stats
    used_pages = 2 * (PAGES_PER_STATE - 1)  # the last parameter's pages are never touched
    if budget_pages is None:  # everything fits: each page comes in once and never leaves
        assert (stats.page_ins, stats.page_outs, stats.evictions) == (used_pages, 0, 0)
    else:  # a cyclic scan over more pages than fit: every page comes in and goes out once per step
        assert stats.page_ins == 100 * used_pages
        assert stats.page_outs == stats.evictions == stats.page_ins - budget_pages
        assert stats.peak_resident_bytes == budget
    assert_states_equal(paged, reference)  # state_dict() writes the dirty resident pages back
    assert stats.page_outs == stats.page_ins


def test_prefetch_brings_in_every_page_but_the_first_pair_when_two_pairs_fit():
    params = make_params()
    paged = PagedAdamW(params, page_bytes=PAGE, resident_bytes=4 * PAGE)
    set_grads(0, params)
    paged.step()
    used_pages = 2 * (PAGES_PER_STATE - 1)
    assert paged.stats.page_ins == used_pages and paged.stats.prefetches == used_pages - 2

    tight = PagedAdamW(make_params(), page_bytes=PAGE, resident_bytes=3 * PAGE)
    set_grads(0, tight.param_groups[0]["params"])
    tight.step()
    assert tight.stats.prefetches == 0, "a third page is not room for the next pair: no prefetch"


def test_shrinking_the_budget_between_steps_evicts_and_stays_equal():
    params, reference_params = make_params(), make_params()
    paged = PagedAdamW(params, **HYPER, page_bytes=PAGE)
    reference = torch.optim.AdamW(reference_params, **HYPER)
    for step, budget_pages in enumerate([None, 10, 2, 30, None, 3]):
        if budget_pages is not None:
            evictions, page_outs = paged.stats.evictions, paged.stats.page_outs
            paged.resident_bytes = budget_pages * PAGE
            assert paged.stats.resident_bytes <= budget_pages * PAGE
            if step == 1:  # all 44 used pages were resident and dirty: 34 must leave, each written back
                assert paged.stats.evictions - evictions == paged.stats.page_outs - page_outs == 44 - 10
        train([(paged, params), (reference, reference_params)], 1, start=step)
    assert max_difference(params, reference_params) <= 1e-6
    assert paged.stats.bytes_moved == (paged.stats.page_ins + paged.stats.page_outs) * PAGE


def test_state_dict_round_trip_mid_training_and_torch_interchange():
    params, reference_params = make_params(), make_params()
    paged = PagedAdamW(groups(params), **HYPER, page_bytes=PAGE, resident_bytes=5 * PAGE)
    reference = torch.optim.AdamW(groups(reference_params), **HYPER)
    train([(paged, params), (reference, reference_params)], 50)

    buffer = io.BytesIO()
    torch.save(paged.state_dict(), buffer)  # while pages are resident and dirty
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_params = [torch.torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PagedAdamW(groups(resumed_params), page_bytes=PAGE, resident_bytes=2 * PAGE)  # other budget
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == HYPER["lr"] and resumed.param_groups[1]["lr"] == 3e-3

    # torch.optim.AdamW loads PagedAdamW's state_dict, and PagedAdamW loads torch's.
    torch_params = [torch.torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_resumed = torch.optim.AdamW(groups(torch_params))
    torch_resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    from_torch_params = [torch.torch.nn.Parameter(p.detach().clone()) for p in params]
    from_torch = PagedAdamW(groups(from_torch_params), page_bytes=PAGE, resident_bytes=4 * PAGE)
    reference_buffer = io.BytesIO()
    torch.save(reference.state_dict(), reference_buffer)
    from_torch.load_state_dict(torch.load(io.BytesIO(reference_buffer.getvalue())))

    train(
        [
            (paged, params),
            (reference, reference_params),
            (resumed, resumed_params),
            (torch_resumed, torch_params),
            (from_torch, from_torch_params),
        ],
        50,
        start=50,
    )
    for other in (params, resumed_params, torch_params, from_torch_params):
        assert max_difference(other, reference_params) <= 1e-6
    for optimizer in (resumed, from_torch):
        assert_states_equal(optimizer, reference)


def test_bfloat16_and_float32_parameters_together():
    params, reference_params = make_params(dtype=torch.bfloat16), make_params(dtype=torch.bfloat16)
    params[0].data, reference_params[0].data = params[0].data.float(), reference_params[0].data.float()
    paged = PagedAdamW(params, **HYPER, page_bytes=PAGE, resident_bytes=2 * PAGE)
    reference = torch.optim.AdamW(reference_params, **HYPER)
    train([(paged, params), (reference, reference_params)], 20)
    assert max_difference(params, reference_params) <= 1e-6
    assert_states_equal(paged, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (pinned pool, side stream) needs a GPU")
@pytest.mark.parametrize("budget_pages", [2, 4, None])
def test_cuda_pinned_pool_and_side_stream_equal_torch(budget_pages):
    params = [torch.torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    reference_params = [torch.torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    resident = None if budget_pages is None else budget_pages * PAGE
    paged = PagedAdamW(groups(params), **HYPER, page_bytes=PAGE, resident_bytes=resident)
    reference = torch.optim.AdamW(groups(reference_params), **HYPER)
    assert paged._pager.host.is_pinned() and paged._pager.stream is not None
    train([(paged, params), (reference, reference_params)], 30)
    assert max_difference(params, reference_params) <= 1e-6
    assert_states_equal(paged, reference)


def test_pager_evicts_least_recently_used_and_writes_back_only_dirty_pages():
    pager = Pager(n_pages=4, page_bytes=8, capacity=2, device="cpu")
    pager.host[:] = torch.arange(4, dtype=torch.uint8)[:, None]
    pager.page(0).fill_(10)  # page 0 changed on the device
    pager.prefetch([1])  # clean: prefetched, never handed out
    pager.page(0)  # 0 is now the most recently used
    pager.page(2)  # evicts 1 (least recently used, clean: no write-back)
    assert list(pager.resident) == [0, 2] and pager.stats.page_outs == 0
    pager.page(3)  # evicts 0, which is dirty: written back
    assert list(pager.resident) == [2, 3] and pager.stats.page_outs == 1
    assert pager.host[0].tolist() == [10] * 8 and pager.host[1].tolist() == [1] * 8
    assert pager.stats.bytes_moved == (pager.stats.page_ins + pager.stats.page_outs) * 8


def float_params():
    return [torch.torch.nn.Parameter(torch.zeros(10))]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), r"lr must be a number >= 0, got -1.0"),
        (dict(betas=(1.0, 0.999)), r"betas must be two numbers in \[0, 1\), got \(1.0, 0.999\)"),
        (dict(betas=(0.9,)), r"betas must be two numbers"),
        (dict(eps=-1e-8), r"eps must be a number >= 0"),
        (dict(weight_decay=-0.1), r"weight_decay must be a number >= 0, got -0.1"),
        (dict(page_bytes=6), r"page_bytes=6 is not a multiple of the 4-byte elements .* pick a multiple of 4"),
        (dict(page_bytes=0), r"page_bytes must be a positive int, got 0"),
        (dict(page_bytes=64.0), r"page_bytes must be a positive int"),
        (dict(page_bytes=64, resident_bytes=100), r"resident_bytes=100 is less than one page for each of the two"),
        (dict(page_bytes=64, resident_bytes="1GB"), r"resident_bytes must be an int or None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW(float_params(), **kwargs)


def test_bad_parameters_and_uses():
    with pytest.raises(ValueError, match=r"floating-point parameters, got one of dtype torch.int64"):
        PagedAdamW([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"lr must be a number >= 0, got -2"):
        PagedAdamW([{"params": float_params(), "lr": -2}])
    optimizer = PagedAdamW(float_params(), page_bytes=64)
    with pytest.raises(ValueError, match=r"resident_bytes=64 is less than one page .* at least 2 \* page_bytes = 128"):
        optimizer.resident_bytes = 64
    with pytest.raises(NotImplementedError, match="pass every parameter group to the constructor"):
        optimizer.add_param_group({"params": float_params()})
    param = optimizer.param_groups[0]["params"][0]
    param.grad = torch.zeros(10).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        optimizer.step()
    amsgrad_params = float_params()
    amsgrad = torch.optim.AdamW(amsgrad_params, amsgrad=True)
    amsgrad_params[0].grad = torch.ones(10)
    amsgrad.step()
    with pytest.raises(ValueError, match="amsgrad and maximize must be False"):
        PagedAdamW(float_params()).load_state_dict(amsgrad.state_dict())


def test_a_state_for_parameters_of_other_shapes_is_refused_and_nothing_changes():
    # same number of values, sizes swapped: without the check the moments would spill across parameters' pages
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))
    swapped = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2, 3))]
    saver = torch.optim.AdamW(swapped)
    for p in swapped:
        p.grad = torch.ones_like(p)
    saver.step()
    optimizer = PagedAdamW([a, b], page_bytes=64)
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match=r"the saved exp_avg of parameter 0 has shape \(3, 2\) but the parameter has "
                                         r"\(2, 3\): load a state_dict saved for the same parameters"):
        optimizer.load_state_dict(saver.state_dict())
    assert optimizer.state_dict() == before
