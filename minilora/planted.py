"""The planted-ranks experiment of notebooks 03 and 04: layers whose ideal update has a known rank.

A frozen network of independent d x d linear layers. The teacher adds to layer k an update of known rank r_k
(orthonormal directions, every singular value 1) and the labels carry Gaussian noise. An adapter that spends a
total budget of sum(r_k) triplets well gives layer k exactly r_k of them and reaches the noise floor on held-out
data; one uniform rank for all layers cannot. This is experiment code shared by two notebooks, not a method.
"""

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from minilora.orthogonal import orthogonal_penalty


class PlantedLayers(nn.Module):
    """Independent linear layers applied to the same input. forward(x, y) gives .prediction [layers, batch, d]
    and .loss (mean squared error against y), the shape of output that peft's AdaLoRA adds its regularizer to."""

    def __init__(self, n_layers, d):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_layers))

    def forward(self, x, y=None):
        prediction = torch.stack([layer(x) for layer in self.layers])
        return SimpleNamespace(prediction=prediction, loss=None if y is None else (prediction - y).pow(2).mean())


@dataclass
class PlantedTask:
    base: PlantedLayers  # the frozen starting network; student() gives a fresh copy
    ranks: tuple
    noise: float
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def target_modules(self):
        return [f"layers.{k}" for k in range(len(self.ranks))]

    def student(self):
        return copy.deepcopy(self.base)


@torch.no_grad()
def planted_task(ranks=(0, 1, 2, 4, 8), d=32, n_train=512, n_test=1024, noise=0.1, seed=0):
    """Build the frozen base, the teacher's planted updates and noisy train / held-out data (all seeded)."""
    gen = torch.Generator().manual_seed(seed)
    base = PlantedLayers(len(ranks), d).requires_grad_(False)
    teachers = []
    for layer, rank in zip(base.layers, ranks, strict=True):
        layer.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
        left = torch.linalg.qr(torch.randn(d, d, generator=gen))[0][:, :rank]
        right = torch.linalg.qr(torch.randn(d, d, generator=gen))[0][:, :rank]
        teachers.append(layer.weight + left @ right.T)  # a rank-`rank` change with singular values 1

    def sample(n):
        x = torch.randn(n, d, generator=gen)
        y = torch.stack([x @ w.T for w in teachers])
        return x, y + noise * torch.randn(y.shape, generator=gen)

    return PlantedTask(base, tuple(ranks), noise, *sample(n_train), *sample(n_test))


@torch.no_grad()
def held_out_loss(model, task):
    return model(task.x_test, task.y_test).loss.item()


def fit(model, task, steps, lr=0.005, batch=64, orth_reg_weight=0.0, after_step=None, seed=0):
    """Train model's trainable parameters with AdamW on minibatches; return the held-out loss.

    Each step: loss (+ orth_reg_weight * orthogonal_penalty(model), minilora's SVD adapters) -> backward ->
    optimizer.step() -> after_step(step) (where an allocator goes: it reads the gradients) -> zero_grad().
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, len(task.x_train), (batch,), generator=gen)
        loss = model(task.x_train[rows], task.y_train[:, rows]).loss
        if orth_reg_weight:
            loss = loss + orth_reg_weight * orthogonal_penalty(model)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
    return held_out_loss(model, task)
