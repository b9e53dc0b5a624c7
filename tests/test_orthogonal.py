"""orthogonal_penalty (AdaLoRA eq. 4): direct computation, peft's training term as the oracle, errors, gradients."""

import types

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from minilora.orthogonal import orthogonal_penalty
from minilora.svd_adapter import SVDLinear


def drifted(d_in, d_out, r, seed):
    torch.manual_seed(seed)
    layer = SVDLinear(nn.Linear(d_in, d_out), r=r, lora_alpha=r)
    with torch.no_grad():
        layer.P.normal_(std=0.4)
        layer.Q.normal_(std=0.4)
    return layer


def frobenius(matrix):
    return matrix.square().sum().sqrt()


@pytest.fixture
def model():
    return nn.Sequential(drifted(12, 10, 3, 0), nn.ReLU(), drifted(10, 7, 5, 1))


def direct_terms(model):
    """‖PᵀP − I‖_F and ‖QQᵀ − I‖_F of each adapter, written out with explicit identity matrices."""
    terms = []
    for layer in (model[0], model[2]):
        r = layer.lam.numel()
        terms.append(frobenius(layer.P.T @ layer.P - torch.eye(r)))
        terms.append(frobenius(layer.Q @ layer.Q.T - torch.eye(r)))
    return terms


def test_default_is_the_mean_of_unsquared_norms(model):
    terms = direct_terms(model)
    torch.testing.assert_close(orthogonal_penalty(model), sum(terms) / 4)


def test_squared_is_the_paper_sum(model):
    terms = direct_terms(model)
    expected = sum(t.square() for t in terms)
    torch.testing.assert_close(orthogonal_penalty(model, squared=True), expected, rtol=1e-5, atol=0)


def test_zero_for_orthonormal_factors_and_works_on_one_module():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(20, 16), r=5, lora_alpha=5, init="svd")
    assert orthogonal_penalty(layer).item() < 1e-5
    assert orthogonal_penalty(layer, squared=True).item() < 1e-10


def test_gradient_matches_the_analytic_form(model):
    orthogonal_penalty(model, squared=True).backward()
    for layer in (model[0], model[2]):
        eye = torch.eye(layer.lam.numel())
        torch.testing.assert_close(layer.P.grad, 4 * layer.P @ (layer.P.T @ layer.P - eye), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.Q.grad, 4 * (layer.Q @ layer.Q.T - eye) @ layer.Q, rtol=1e-4, atol=1e-5)
        assert layer.lam.grad is None and layer.base.weight.grad is None


def test_rank_zero_adapters_count_as_zero_and_keep_gradients_finite():
    layer = drifted(10, 8, 4, 2)
    empty = drifted(10, 8, 4, 3)
    empty.keep_triplets([False] * 4)
    model = nn.ModuleList([layer, empty])
    value = orthogonal_penalty(model)
    torch.testing.assert_close(value, orthogonal_penalty(layer) / 2)  # 2 of 4 norms are 0, as in peft
    value.backward()
    assert torch.isfinite(layer.P.grad).all() and empty.P.grad.shape == (8, 0)


def test_no_adapters_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match=r"Sequential has no SVDLinear adapters.*call add_adalora\(model, config\)"):
        orthogonal_penalty(nn.Sequential(nn.Linear(3, 3)))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        out = self.down(torch.relu(self.up(x)))
        return types.SimpleNamespace(loss=0.0 * out.sum())  # zero task loss: peft's returned loss is its term


@pytest.mark.parametrize("pruned", [False, True])
def test_equals_the_term_peft_adds_to_the_loss(pruned):
    torch.manual_seed(0)
    weight = 0.3
    config = AdaLoraConfig(target_modules=["up", "down"], init_r=6, lora_alpha=6, total_step=10, orth_reg_weight=weight)
    reference = get_peft_model(TwoLayers(), config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(std=0.3)
    ours = nn.ModuleDict()
    for name in ("up", "down"):
        theirs = getattr(reference.base_model.model, name)
        layer = SVDLinear(nn.Linear(theirs.in_features, theirs.out_features), r=6, lora_alpha=6)
        with torch.no_grad():
            layer.P.copy_(theirs.lora_B["default"])
            layer.Q.copy_(theirs.lora_A["default"])
        ours[name] = layer
    if pruned:
        keep = [True, False, True, True, False, False]
        reference.base_model.resize_modules_by_rank_pattern({"up.lora_E": keep, "down.lora_E": [False] * 6}, "default")
        ours["up"].keep_triplets(keep)
        ours["down"].keep_triplets([False] * 6)
        assert reference.base_model.model.down.lora_A["default"].shape == (0, 32)
    peft_loss = reference.base_model(torch.randn(3, 16)).loss
    ours_loss = weight * orthogonal_penalty(ours)
    torch.testing.assert_close(ours_loss, peft_loss, rtol=1e-6, atol=1e-6)
    peft_loss.backward()
    ours_loss.backward()
    torch.testing.assert_close(ours["up"].P.grad, reference.base_model.model.up.lora_B["default"].grad)
    torch.testing.assert_close(ours["up"].Q.grad, reference.base_model.model.up.lora_A["default"].grad)
