"""Importance scores (AdaLoRA eq. 9-13): closed forms, and peft's RankAllocator as the oracle."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from minilora.importance import ImportanceTracker, sensitivity, triplet_score


def test_sensitivity_is_abs_weight_times_grad():
    w, g = torch.tensor([2.0, -3.0, 0.5]), torch.tensor([-1.0, -2.0, 0.0])
    assert torch.equal(sensitivity(w, g), torch.tensor([2.0, 6.0, 0.0]))


def test_first_update_uses_the_already_updated_average():
    tracker = ImportanceTracker(beta1=0.8, beta2=0.7)
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    tracker.update("w", w, g)
    current = torch.tensor([3.0, 2.0])
    smoothed = 0.2 * current
    # eq. 12 against the updated average: |I - 0.2 I| = 0.8 I (against the old, zero average it would be I)
    uncertainty = 0.3 * 0.8 * current
    torch.testing.assert_close(tracker.smoothed["w"], smoothed, rtol=1e-6, atol=0)
    torch.testing.assert_close(tracker.uncertainty["w"], uncertainty, rtol=1e-6, atol=0)
    torch.testing.assert_close(tracker.score("w"), smoothed * uncertainty, rtol=1e-6, atol=0)


def test_a_steady_sensitivity_loses_its_uncertainty():
    tracker = ImportanceTracker(beta1=0.5, beta2=0.5)
    w, g = torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    for _ in range(60):
        tracker.update("w", w, g)
    torch.testing.assert_close(tracker.smoothed["w"], torch.full_like(w, 2.0))
    assert tracker.uncertainty["w"].max() < 1e-12 and tracker.score("w").max() < 1e-12


def test_a_noisy_sensitivity_scores_higher_than_a_steady_one_with_the_same_mean():
    tracker = ImportanceTracker()
    w = torch.ones(1)
    for step in range(200):
        tracker.update("steady", w, torch.ones(1))
        tracker.update("noisy", w, torch.tensor([2.0 if step % 2 else 0.0]))
    assert abs(tracker.smoothed["noisy"].item() - tracker.smoothed["steady"].item()) < 0.1
    assert tracker.score("noisy").item() > 10 * tracker.score("steady").item()


def test_triplet_score_adds_lambda_to_the_means_of_its_column_and_row():
    torch.manual_seed(0)
    s_P, s_lam, s_Q = torch.rand(5, 3), torch.rand(3), torch.rand(3, 4)
    expected = torch.stack([s_lam[i] + s_P[:, i].mean() + s_Q[i, :].mean() for i in range(3)])
    torch.testing.assert_close(triplet_score(s_P, s_lam, s_Q), expected)


def test_scores_match_peft_rank_allocator():
    """Feed the same weights and gradients to peft's RankAllocator and to ImportanceTracker for several steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64))
    config = AdaLoraConfig(target_modules=["0"], init_r=3, target_r=2, total_step=10, beta1=0.8, beta2=0.6)
    peft_model = get_peft_model(model, config)
    allocator = peft_model.base_model.rankallocator
    layer = peft_model.base_model.model[0]
    tracker = ImportanceTracker(beta1=0.8, beta2=0.6)
    names = {"P": layer.lora_B["default"], "lam": layer.lora_E["default"], "Q": layer.lora_A["default"]}
    for _ in range(4):
        for p in names.values():
            p.data.normal_()
            p.grad = torch.randn_like(p)
        allocator.update_ipt(peft_model.base_model.model)
        for key, p in names.items():
            tracker.update(key, p, p.grad)
    ours_name = {"lora_B": "P", "lora_E": "lam", "lora_A": "Q"}
    peft_scores = {}
    for n in allocator.exp_avg_ipt:
        key = ours_name[n.split(".")[-2]]
        torch.testing.assert_close(tracker.smoothed[key], allocator.exp_avg_ipt[n], rtol=0, atol=0)
        torch.testing.assert_close(tracker.uncertainty[key], allocator.exp_avg_unc[n], rtol=0, atol=0)
        peft_scores[key] = allocator._element_score(n)
    assert sorted(peft_scores) == ["P", "Q", "lam"]
    ours = triplet_score(tracker.score("P"), tracker.score("lam").view(-1), tracker.score("Q"))
    theirs = allocator._combine_ipt(
        peft_scores["lam"], torch.cat([peft_scores["Q"].mean(1, keepdim=True), peft_scores["P"].mean(0).view(-1, 1)], 1)
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5])
def test_betas_outside_the_open_unit_interval_are_refused(beta):
    with pytest.raises(ValueError, match=f"beta1={beta} must lie strictly between 0 and 1"):
        ImportanceTracker(beta1=beta)
    with pytest.raises(ValueError, match=f"beta2={beta} must lie strictly between 0 and 1"):
        ImportanceTracker(beta2=beta)


def test_missing_gradient_and_missing_scores_say_what_to_do():
    tracker = ImportanceTracker()
    with pytest.raises(ValueError, match="no gradient for w: .*before optimizer.zero_grad"):
        tracker.update("w", torch.ones(2), None)
    with pytest.raises(KeyError, match="no importance scores for w yet"):
        tracker.score("w")


def test_state_dict_round_trip_and_beta_mismatch():
    tracker = ImportanceTracker(beta1=0.9, beta2=0.8)
    tracker.update("w", torch.randn(4), torch.randn(4))
    state = tracker.state_dict()
    tracker.update("w", torch.randn(4), torch.randn(4))  # must not leak into the saved state
    restored = ImportanceTracker(beta1=0.9, beta2=0.8)
    restored.load_state_dict(state)
    assert not torch.equal(restored.score("w"), tracker.score("w"))
    tracker.load_state_dict(state)
    assert torch.equal(restored.score("w"), tracker.score("w"))
    with pytest.raises(ValueError, match="saved scores use beta1=0.9, beta2=0.8 but this tracker has beta1=0.85"):
        ImportanceTracker().load_state_dict(state)
