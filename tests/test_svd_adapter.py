"""SVDLinear (AdaLoRA eq. 3): shapes, both inits, merge/unmerge, rank 0, dropout, and peft's layer as the oracle."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from minilora.svd_adapter import SVDLinear


def make(r=4, init="adalora", dropout=0.0, seed=0, d_in=24, d_out=16, trained=True):
    torch.manual_seed(seed)
    layer = SVDLinear(nn.Linear(d_in, d_out), r=r, lora_alpha=8, lora_dropout=dropout, init=init)
    if trained:  # nonzero singular values, as after some training
        with torch.no_grad():
            layer.lam.add_(torch.randn(r))
    return layer


def manual(layer, x):
    """W x + b + s · P diag(λ) Q x, written out directly."""
    delta = layer.P @ torch.diag(layer.lam) @ layer.Q * layer.scaling
    return x @ (layer.base.weight + delta).T + layer.base.bias


def test_shapes_parameters_and_frozen_base():
    layer = make(trained=False)
    assert layer.P.shape == (16, 4) and layer.lam.shape == (4,) and layer.Q.shape == (4, 24)
    assert layer.r == 4 and layer.scaling == 8 / 4
    assert all(p.dtype == torch.float32 for p in (layer.P, layer.lam, layer.Q))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"P", "lam", "Q"}


@pytest.mark.parametrize("shape", [(24,), (3, 24), (2, 5, 24), (2, 2, 3, 24)])
def test_forward_any_leading_dims_matches_formula(shape):
    layer = make()
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 16)
    torch.testing.assert_close(y, manual(layer, x), atol=1e-5, rtol=1e-5)


def test_adalora_init_starts_at_the_base_and_lambda_gets_gradient():
    torch.manual_seed(0)
    base = nn.Linear(256, 128)
    layer = SVDLinear(base, r=12, lora_alpha=8)
    assert torch.count_nonzero(layer.lam) == 0
    for tensor in (layer.P, layer.Q):  # N(0, 0.02²), like peft's A and B
        assert abs(tensor.std().item() - 0.02) < 0.002 and abs(tensor.mean().item()) < 0.002
    x = torch.randn(4, 256)
    assert torch.equal(layer(x), base(x))
    layer(x).square().sum().backward()
    assert layer.lam.grad.abs().min() > 0 and base.weight.grad is None


def test_svd_init_keeps_the_output_and_holds_the_top_singular_triplets():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    original = base.weight.detach().clone()
    x = torch.randn(5, 24)
    expected = base(x)
    layer = SVDLinear(base, r=4, lora_alpha=8, init="svd")
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    U, S, Vh = torch.linalg.svd(original)
    torch.testing.assert_close(layer.lam * layer.scaling, S[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.P.T @ layer.P, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.Q @ layer.Q.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(base.weight + layer.delta_weight(), original, atol=1e-6, rtol=0)
    # the base keeps only the rest of the spectrum
    torch.testing.assert_close(torch.linalg.svdvals(base.weight)[:12], S[4:], atol=1e-5, rtol=1e-5)


def test_svd_init_rank_above_the_matrix_rank_is_refused():
    with pytest.raises(ValueError, match=r"init='svd' needs r <= min\(out, in\) = 16, got r=20"):
        SVDLinear(nn.Linear(24, 16), r=20, lora_alpha=8, init="svd")


def test_merge_and_unmerge_keep_outputs_and_restore_the_weight():
    layer = make()
    x = torch.randn(3, 24)
    before, weight = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, weight + layer.delta_weight())
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_needs_a_dense_base_weight():
    class Opaque(nn.Module):  # a stand-in for a quantized layer: sizes and a forward, no float weight
        in_features, out_features = 8, 4

        def forward(self, x):
            return x[..., :4]

    layer = SVDLinear(Opaque(), r=2, lora_alpha=2)
    assert layer(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(TypeError, match="dequantize it"):
        layer.merge()
    with pytest.raises(TypeError, match="floating-point .weight"):
        SVDLinear(Opaque(), r=2, lora_alpha=2, init="svd")


def test_rank_zero_all_ways():
    x = torch.randn(3, 24)
    empty = SVDLinear(nn.Linear(24, 16), r=0, lora_alpha=8)
    assert empty.P.shape == (16, 0) and torch.equal(empty(x), empty.base(x))
    masked = make()
    with torch.no_grad():
        masked.lam.zero_()
    assert torch.equal(masked(x), masked.base(x))
    masked.keep_triplets([False] * 4)
    assert masked.lam.shape == (0,) and masked.r == 4 and torch.equal(masked(x), masked.base(x))
    masked(x).sum().backward()
    assert masked.P.grad.shape == (16, 0)
    masked.merge()
    masked.unmerge()


def test_keep_triplets_drops_switched_off_triplets_without_changing_output():
    layer = make(r=6)
    with torch.no_grad():
        layer.lam[[1, 4]] = 0.0
    x = torch.randn(4, 24)
    before, scaling = layer(x), layer.scaling
    keep = [True, False, True, True, False, True]
    kept_q = layer.Q.detach()[torch.tensor(keep)].clone()
    layer.keep_triplets(keep)
    assert layer.P.shape == (16, 4) and layer.Q.shape == (4, 24) and layer.scaling == scaling
    assert torch.equal(layer.Q, kept_q) and layer.lam.requires_grad
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"one flag per stored triplet: shape \(4,\)"):
        layer.keep_triplets([True, False])


def test_dropout_acts_on_the_adapter_input_only():
    layer = make(dropout=0.5)
    x = torch.randn(6, 24)
    layer.train()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base(x) + (mask_x @ layer.Q.T @ torch.diag(layer.lam) @ layer.P.T) * layer.scaling
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), manual(layer, x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.lam.zero_()
    layer.train()
    assert torch.equal(layer(x), layer.base(x))  # the base path is never dropped


def test_low_precision_base_keeps_float32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    layer = SVDLinear(base, r=4, lora_alpha=8)
    y = layer(torch.randn(2, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.P.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"init": "pissa"}, ValueError, r"unknown init 'pissa': use one of \('adalora', 'svd'\)"),
        ({"r": -1}, ValueError, r"r=-1 must be >= 0"),
        ({"lora_dropout": 1.0}, ValueError, r"lora_dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"r": 4, "lora_alpha": 8} | kwargs
    with pytest.raises(error, match=match):
        SVDLinear(nn.Linear(24, 16), **arguments)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 16)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_output_and_gradients_as_peft_adalora_layer(dropout):
    torch.manual_seed(0)
    config = AdaLoraConfig(target_modules=["proj"], init_r=4, lora_alpha=8, lora_dropout=dropout, total_step=10)
    reference = get_peft_model(Tiny(), config)
    theirs = reference.base_model.model.proj
    with torch.no_grad():
        theirs.lora_E["default"].copy_(torch.randn(4, 1))
    ours = SVDLinear(nn.Linear(24, 16), r=4, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():
        ours.base.load_state_dict(theirs.base_layer.state_dict())
        ours.Q.copy_(theirs.lora_A["default"])
        ours.lam.copy_(theirs.lora_E["default"].squeeze(1))
        ours.P.copy_(theirs.lora_B["default"])
    ours.scaling = 8 / (4 + 1e-5)  # peft divides by r + 1e-5
    reference.train()
    ours.train()
    x = torch.randn(3, 5, 24)
    torch.manual_seed(7)
    y_theirs = reference(x)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-6)
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_theirs * target).sum().backward()
    torch.testing.assert_close(ours.Q.grad, theirs.lora_A["default"].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.lam.grad, theirs.lora_E["default"].grad.squeeze(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.P.grad, theirs.lora_B["default"].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), atol=1e-7, rtol=1e-6)
