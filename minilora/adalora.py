"""AdaLoRA in one call (Zhang et al., ICLR 2023, arXiv 2303.10512): its settings and the model surgery.

``AdaLoRAConfig`` holds every setting of the method and checks them up front, so that a bad schedule fails at
construction with a message that says what to change, not in the middle of training. ``add_adalora`` freezes a
model, replaces its targeted linear layers with ``SVDLinear`` adapters (ΔW = PΛQ, paper eq. 3) and returns the
``RankAllocator`` that prunes their triplets during training (paper eqs. 8-13).
"""

from dataclasses import dataclass

from minilora.lora import find_linear_targets, replace_module
from minilora.svd_adapter import INITS, SVDLinear


@dataclass
class AdaLoRAConfig:
    """Settings of an AdaLoRA run; invalid values raise ValueError at construction.

    Args:
        target_modules: names of the linear layers to adapt, matched like peft: a module matches a name when its
            full name equals it or ends with "." + name (["q_proj", "v_proj"] adapts every attention q and v).
        init_r: initial rank of every adapter (the paper starts about 1.5x above the target).
        target_r: average final rank; the final budget is target_r x the number of adapted layers.
        t_init: optimizer steps of warm-up before any pruning, so that importance scores have signal.
            Default (None): 10% of total_steps. peft's default is 0.
        t_final: optimizer steps at the end with the final rank pattern fixed (a duration, as in peft).
            Default (None): 30% of total_steps. peft's default is 0, which with steps numbered 0 .. total_steps - 1
            means the final mask is never applied.
        total_steps: REQUIRED: optimizer steps of the whole run, i.e. micro-batches / gradient-accumulation steps
            (len(loader) // accumulation * epochs), not micro-batches.
        delta_t: steps between two maskings during the budget phase (the paper uses 100 on GLUE; peft defaults to 1).
        beta1, beta2: EMA factors of sensitivity and uncertainty (paper eqs. 11-12), in (0, 1).
        orth_reg_weight: weight γ of the orthogonal penalty (paper eq. 4; peft 0.5, the paper's scripts 0.1).
        lora_alpha: scaling numerator, scaling = lora_alpha / init_r (peft's default 8).
        lora_dropout: dropout on the adapters' input.
        init: "adalora" (Λ = 0, Gaussian P and Q) or "svd" (principal SVD of each base weight).

    Training contract (what the loop must do, once per OPTIMIZER step, including under gradient accumulation)::

        model, allocator = add_adalora(model, config)
        loss = task_loss + config.orth_reg_weight * orthogonal_penalty(model)   # minilora.orthogonal
        loss.backward()                     # (accumulate over micro-batches as usual)
        optimizer.step()
        allocator.step(global_step)         # after optimizer.step(), before zero_grad(): it reads the gradients
        optimizer.zero_grad()
        global_step += 1                    # counts optimizer steps; total_steps counts the same thing
    """

    target_modules: list
    init_r: int = 12
    target_r: int = 8
    t_init: int | None = None
    t_final: int | None = None
    total_steps: int | None = None
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init: str = "adalora"

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules or [])
        if not self.target_modules:
            raise ValueError(
                "target_modules is empty: name the linear layers to adapt, e.g. target_modules=['q_proj', 'v_proj']"
            )
        if self.total_steps is None:
            raise ValueError(
                "AdaLoRAConfig needs total_steps: the number of optimizer steps of the whole run "
                "(len(loader) // gradient_accumulation_steps * epochs); the budget schedule is built from it"
            )
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1 (optimizer steps of the whole run)")
        if self.t_init is None:
            self.t_init = self.total_steps // 10
        if self.t_final is None:
            self.t_final = self.total_steps * 3 // 10
        if self.t_init < 0 or self.t_final < 0:
            raise ValueError(f"t_init={self.t_init} and t_final={self.t_final} are step counts: use values >= 0")
        if self.t_init >= self.total_steps - self.t_final:
            raise ValueError(
                f"the budget phase is empty: t_init={self.t_init} >= total_steps - t_final = "
                f"{self.total_steps} - {self.t_final} = {self.total_steps - self.t_final}, so ranks would never be "
                "reduced. Lower t_init or t_final, or raise total_steps"
            )
        if self.init_r < 1:
            raise ValueError(f"init_r={self.init_r} must be >= 1 (the starting rank of every adapter)")
        if self.target_r < 1:
            raise ValueError(f"target_r={self.target_r} must be >= 1 (the average final rank)")
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} is above init_r={self.init_r}: AdaLoRA only removes ranks. "
                f"Set target_r <= init_r, or raise init_r (the paper starts about 1.5x above the target)"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}={value} must be in (0, 1) (an EMA factor; the paper uses 0.85)")
        if self.delta_t < 1:
            raise ValueError(f"delta_t={self.delta_t} is the number of steps between maskings: use an integer >= 1")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0 (0 switches the penalty off)")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0 (scaling = lora_alpha / init_r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: use one of {INITS}")


def attach_svd_adapters(model, config):
    """Freeze every parameter of model and replace each targeted linear layer by an SVDLinear, in place.

    Returns the names of the replaced modules. Raises ValueError when the model already has SVD adapters or when
    no linear layer matches config.target_modules.
    """
    if not isinstance(config, AdaLoRAConfig):
        raise TypeError(f"expected a minilora AdaLoRAConfig, got {type(config).__name__}")
    if any(isinstance(module, SVDLinear) for module in model.modules()):
        raise ValueError("this model already has SVD adapters; start again from the base model")
    model.requires_grad_(False)
    names = [name for name, _ in find_linear_targets(model, config.target_modules)]
    for name in names:
        adapter = SVDLinear(model.get_submodule(name), config.init_r, config.lora_alpha, config.lora_dropout,
                            config.init)
        replace_module(model, name, adapter)
    return names


def add_adalora(model, config):
    """Put AdaLoRA adapters on model (in place) and return (model, allocator).

    Every base parameter is frozen; each linear layer named by config.target_modules becomes an SVDLinear with
    config.init_r triplets; the returned minilora.budget.RankAllocator prunes them during training. See
    AdaLoRAConfig for the training loop this expects.
    """
    # imported here: minilora.budget builds on this module's config, so the import graph stays one-way
    from minilora.budget import RankAllocator

    attach_svd_adapters(model, config)
    return model, RankAllocator(model, config)
