"""The cubic budget and the RankAllocator: every schedule phase, delta_t > 1, rank 0, resume, misuse.

The adapters here are small hand-made modules with the SVDLinear interface (P [out, r], lam [r], Q [r, in]), so
these tests pin the allocator down on its own; tests/test_peft_agreement.py runs it on the real SVDLinear.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from minilora.budget import RankAllocator, RankAllocatorCore, cubic_budget, svd_adapters, top_b_mask


class TinySVD(torch.nn.Module):
    """A frozen linear layer plus P diag(lam) Q, initialised as AdaLoRA does (lam = 0)."""

    def __init__(self, d, r):
        super().__init__()
        self.base = torch.nn.Linear(d, d, bias=False, dtype=torch.float64).requires_grad_(False)
        self.P = torch.nn.Parameter(0.3 * torch.randn(d, r, dtype=torch.float64))
        self.lam = torch.nn.Parameter(torch.zeros(r, dtype=torch.float64))
        self.Q = torch.nn.Parameter(0.3 * torch.randn(r, d, dtype=torch.float64))

    def forward(self, x):
        return self.base(x) + ((x @ self.Q.T) * self.lam) @ self.P.T


PLANTED = (0, 2, 4)  # the rank each layer's update needs: layer 0 needs none


def make_task(seed=0, d=8, r=4):
    """Three independent layers; the teacher adds a planted update of rank PLANTED[k] to layer k."""
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({f"layer{k}": TinySVD(d, r) for k in range(len(PLANTED))})
    teachers = []
    for layer, rank in zip(model.values(), PLANTED, strict=True):
        delta = torch.randn(d, rank, dtype=torch.float64) @ torch.randn(rank, d, dtype=torch.float64) / d**0.5
        teachers.append(layer.base.weight + delta)
    x = torch.randn(256, d, dtype=torch.float64)
    targets = [x @ w.T + 0.05 * torch.randn(len(x), d, dtype=torch.float64) for w in teachers]  # noisy labels
    return model, x, targets


def config(**overrides):
    values = dict(target_r=2, t_init=5, t_final=10, total_steps=40, delta_t=3, beta1=0.85, beta2=0.85)
    return SimpleNamespace(**{**values, **overrides})


def loss_fn(model, x, targets):
    return sum(((layer(x) - y) ** 2).mean() for layer, y in zip(model.values(), targets, strict=True))


def train(model, allocator, x, targets, steps, optimizer=None, record=None):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    for step in steps:
        loss_fn(model, x, targets).backward()
        optimizer.step()
        allocator.step(step)
        optimizer.zero_grad()
        if record is not None:
            record.append(
                {
                    "step": step,
                    "budget": allocator.budget,
                    "pattern": copy.deepcopy(allocator.rank_pattern),
                    "lam": {name: m.lam.detach().clone() for name, m in model.items()},
                    "P": {name: m.P.detach().clone() for name, m in model.items()},
                }
            )
    return optimizer


def test_cubic_budget_phases_by_hand():
    b = [cubic_budget(t, 30, 10, t_init=4, t_final=6, total_steps=20) for t in range(21)]
    assert b[:5] == [30] * 5 and b[14:] == [10] * 7  # warm-up, then b(T) from T - t_final on
    assert b[5] == int(10 + 20 * (1 - 1 / 10) ** 3) == 24  # int() rounds down, as peft does
    assert all(x >= y for x, y in zip(b, b[1:], strict=False))


def test_cubic_budget_matches_peft_for_every_step_and_many_schedules():
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    peft_model = get_peft_model(model, AdaLoraConfig(target_modules=["0", "1", "2"], init_r=7, total_step=10))
    allocator = peft_model.base_model.rankallocator
    schedules = [(21, 6, 0, 0, 10), (21, 6, 3, 2, 17), (36, 0, 10, 25, 100), (12, 12, 1, 1, 5)]
    for b0, bT, t_init, t_final, total in schedules:
        allocator.init_bgt, allocator.target_bgt = b0, bT
        cfg = allocator.peft_config
        cfg.tinit, cfg.tfinal, cfg.total_step = t_init, t_final, total
        for t in range(total + 1):
            assert cubic_budget(t, b0, bT, t_init, t_final, total) == allocator.budget_schedule(t)[0], (t, b0, bT)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 5, 6, 0, 0, 10), r"need 0 <= bT <= b0, got b0=5, bT=6"),
        ((0, 5, 2, 8, 2, 10), r"t_init=8, t_final=2, total_steps=10 leave no budget phase"),
        ((0, 5, 2, -1, 0, 10), r"t_init=-1, t_final=0, total_steps=10 leave no budget phase"),
    ],
)
def test_cubic_budget_refuses_impossible_schedules(args, match):
    with pytest.raises(ValueError, match=match):
        cubic_budget(*args)


def test_top_b_mask_keeps_exactly_b_and_breaks_ties_by_position():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_b_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert top_b_mask(scores, 0).sum() == 0 and top_b_mask(scores, 5).all()
    assert top_b_mask(torch.zeros(6), 4).tolist() == [True] * 4 + [False] * 2


def test_allocator_through_every_phase():
    model, x, targets = make_task()
    cfg = config()
    allocator = RankAllocator(model, cfg)
    assert list(allocator.adapters) == ["layer0", "layer1", "layer2"]
    assert (allocator.b0, allocator.bT, allocator.final_step) == (12, 6, 30)
    before = loss_fn(model, x, targets).item()
    record = []
    train(model, allocator, x, targets, range(cfg.total_steps), record=record)

    mask_steps = [entry["step"] for entry in allocator.rank_history]
    assert mask_steps == [6, 9, 12, 15, 18, 21, 24, 27, 30]  # delta_t = 3 after warm-up, then the final mask
    for entry in record:
        t = entry["step"]
        assert entry["budget"] == cubic_budget(t, 12, 6, 5, 10, 40)
        kept = sum(sum(p) for p in entry["pattern"].values())
        assert kept == (12 if t < 6 else cubic_budget(max(s for s in mask_steps if s <= t), 12, 6, 5, 10, 40))
        if t in mask_steps or t > 30:  # lam is zero exactly where the pattern says pruned
            for name, pattern in entry["pattern"].items():
                pruned = ~torch.tensor(pattern)
                assert (entry["lam"][name][pruned] == 0).all()
    assert record[4]["budget"] == 12 and record[-1]["budget"] == 6  # warm-up and final phase

    # the final phase: one pattern, frozen, re-applied after every optimizer step; scores were dropped
    assert all(entry["pattern"] == record[30]["pattern"] for entry in record[30:])
    assert allocator.tracker.smoothed == {}
    assert sum(allocator.ranks.values()) == 6
    # the module whose update needs no rank at all ends at rank 0, and the model still trains and runs
    assert allocator.ranks["layer0"] == 0 and allocator.rank_pattern["layer0"] == [False] * 4
    assert loss_fn(model, x, targets).item() < 0.1 * before

    # only lam is masked: a triplet pruned at step 6 still has its P column trained afterwards
    for name, pattern in record[6]["pattern"].items():
        for i in [i for i, kept in enumerate(pattern) if not kept]:
            assert not torch.equal(record[6]["P"][name][:, i], record[8]["P"][name][:, i])


def test_the_core_is_the_same_algorithm_without_the_checks():
    """RankAllocator = RankAllocatorCore + checks + resume: on a correct loop both take the same masks."""
    histories = []
    for allocator_class in (RankAllocatorCore, RankAllocator):
        model, x, targets = make_task()
        allocator = allocator_class(model, config())
        train(model, allocator, x, targets, range(40))
        histories.append((allocator.rank_history, {name: m.lam.detach().clone() for name, m in model.items()}))
    assert histories[0][0] == histories[1][0]
    assert all(torch.equal(histories[0][1][name], histories[1][1][name]) for name in histories[0][1])
    core = RankAllocatorCore(torch.nn.Linear(3, 3), config())  # the core trusts its caller: no adapters, no error
    assert core.adapters == {} and not hasattr(core, "state_dict")


def test_a_subclass_can_replace_the_schedule_and_the_masking_rule():
    class LocalLinear(RankAllocator):
        def budget_at(self, global_step):  # a straight line instead of the cubic, same phases
            c = self.config
            if global_step <= c.t_init or global_step > c.total_steps - c.t_final:
                return super().budget_at(global_step)
            progress = (global_step - c.t_init) / (c.total_steps - c.t_final - c.t_init)
            return int(self.bT + (self.b0 - self.bT) * (1 - progress))

        def select(self, scores):  # each adapter keeps its own share of the budget
            return [top_b_mask(s, self.budget // len(scores)) for s in scores]

    model, x, targets = make_task()
    allocator = LocalLinear(model, config())
    train(model, allocator, x, targets, range(40))
    assert [e["budget"] for e in allocator.rank_history[:3]] == [11, 11, 10]  # the cubic gives 11, 9, 8
    assert all(len(set(e["ranks"].values())) == 1 for e in allocator.rank_history)  # every adapter the same rank
    assert allocator.ranks == {"layer0": 2, "layer1": 2, "layer2": 2}


def test_no_crash_when_the_budget_never_shrinks():
    """target_r == init_r gives k = 0 pruned triplets, which makes peft's kthvalue raise; here nothing is pruned."""
    model, x, targets = make_task()
    allocator = RankAllocator(model, config(target_r=4, delta_t=1))
    train(model, allocator, x, targets, range(40))
    assert len(allocator.rank_history) == 25 and all(all(p) for p in allocator.rank_pattern.values())


def test_ties_keep_exactly_b_triplets():
    """With every score equal, peft's `score <= threshold` rule would prune everything; top-b keeps b."""

    class Flat:
        def update(self, name, weight, grad):
            self.shapes = {**getattr(self, "shapes", {}), name: weight.shape}

        def score(self, name):
            return torch.ones(self.shapes[name], dtype=torch.float64)

        def reset(self):
            pass

    model, x, targets = make_task()
    allocator = RankAllocator(model, config(), tracker=Flat())
    train(model, allocator, x, targets, range(40))
    assert allocator.ranks == {"layer0": 4, "layer1": 2, "layer2": 0}  # ties go to the earlier triplets


def test_skipped_final_step_still_takes_the_final_mask():
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    train(model, allocator, x, targets, [*range(29), 33, 34])  # step 30 = T - t_final never came
    assert allocator.finalized and allocator.rank_history[-1]["step"] == 33
    assert sum(allocator.ranks.values()) == 6


def test_resume_mid_schedule_gives_the_uninterrupted_run():
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    train(model, allocator, x, targets, range(40))

    first, x, targets = make_task()
    first_alloc = RankAllocator(first, config())
    optimizer = train(first, first_alloc, x, targets, range(17))  # stop between two masks of the budget phase
    saved = copy.deepcopy(
        {"model": first.state_dict(), "optim": optimizer.state_dict(), "alloc": first_alloc.state_dict()}
    )
    resumed, _, _ = make_task(seed=1)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_alloc = RankAllocator(resumed, config())
    resumed_alloc.load_state_dict(saved["alloc"])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.05, weight_decay=0.0)
    optimizer.load_state_dict(saved["optim"])
    train(resumed, resumed_alloc, x, targets, range(17, 40), optimizer=optimizer)

    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed_alloc.rank_pattern == allocator.rank_pattern
    assert resumed_alloc.rank_history == allocator.rank_history
    with pytest.raises(ValueError, match=r"covers \['layer0', 'layer1', 'layer2'\] but this model's adapters are"):
        RankAllocator(torch.nn.ModuleDict({"other": TinySVD(4, 2)}), config()).load_state_dict(saved["alloc"])


def allocator_after_zero_grad(set_to_none):
    """An allocator whose model took one optimizer step and then zero_grad(set_to_none): step() comes too late."""
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss_fn(model, x, targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return allocator


def test_step_without_gradients_says_when_to_call_it():
    allocator = allocator_after_zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"layer0.P has no gradient: call allocator.step\(\) after optimizer.step"):
        allocator.step(0)


def test_step_after_zero_grad_without_set_to_none_is_refused():
    """zero_grad(set_to_none=False) leaves every gradient at zero: the scores would all be zero and the masks would
    keep the first b triplets by position. The allocator refuses instead of pruning from nothing."""
    allocator = allocator_after_zero_grad(set_to_none=False)
    with pytest.raises(ValueError, match=r"step\(0\): every adapter gradient is zero, .*: call allocator\.step\("
                       r"global_step\) after optimizer\.step\(\) and before optimizer\.zero_grad\(\)"):
        allocator.step(0)
    assert allocator.last_step is None and allocator.tracker.smoothed == {}  # nothing was scored


def test_zero_gradients_are_fine_where_they_can_be_legitimate():
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(30):  # one adapter with all-zero gradients (its layer had no loss this step) is scored as such
        loss_fn(model, x, targets).backward()
        optimizer.step()
        for key in ("P", "lam", "Q"):
            getattr(model["layer0"], key).grad.zero_()
        allocator.step(step)
        optimizer.zero_grad(set_to_none=False)
    assert (allocator.tracker.smoothed["layer0.lam"] == 0).all() and allocator.tracker.smoothed["layer2.lam"].any()
    for step in range(30, 40):  # from T - t_final on nothing is scored, so the gradients are not read
        allocator.step(step)
    assert allocator.finalized and sum(allocator.ranks.values()) == 6


def test_steps_must_move_forward_once_per_optimizer_step():
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    train(model, allocator, x, targets, range(3))
    loss_fn(model, x, targets).backward()
    with pytest.raises(ValueError, match=r"step\(2\) after step\(2\): call step\(\) once per optimizer step"):
        allocator.step(2)
    with pytest.raises(ValueError, match=r"step\(1\) after step\(2\)"):
        allocator.step(1)
    with pytest.raises(TypeError, match=r"global_step=2.5 must be an int"):
        allocator.step(2.5)
    with pytest.raises(ValueError, match=r"global_step=-1 must be >= 0"):
        allocator.step(-1)


def test_counting_micro_batches_is_caught():
    model, x, targets = make_task()
    allocator = RankAllocator(model, config())
    loss_fn(model, x, targets).backward()
    with pytest.raises(ValueError, match=r"global_step=41 is beyond total_steps=40: count optimizer steps, not micro"):
        allocator.step(41)


def test_bad_models_and_configs_are_refused():
    with pytest.raises(ValueError, match="the model has no SVD adapters .* call add_adalora first"):
        RankAllocator(torch.nn.Linear(3, 3), config())
    model, _, _ = make_task()
    with pytest.raises(ValueError, match=r"target_r=5 exceeds the adapters' average initial rank \(4\)"):
        RankAllocator(model, config(target_r=5))
    with pytest.raises(ValueError, match="delta_t=0 must be at least 1"):
        RankAllocator(model, config(delta_t=0))
    with pytest.raises(ValueError, match="t_init=30, t_final=10, total_steps=40 leave no budget phase"):
        RankAllocator(model, config(t_init=30))
    assert list(svd_adapters(model)) == ["layer0", "layer1", "layer2"]
