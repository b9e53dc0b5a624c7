"""The rank budget of AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): the cubic schedule b(t) (appendix)
and the global top-b(t) masking of singular values over all adapted matrices (eq. 8).

Training has three phases: warm-up (t <= t_init, full budget b(0)), the budget phase (b(t) falls as a cubic and
every delta_t steps only the b(t) most important triplets keep their singular value), and the final phase
(t >= T - t_final: one last mask to b(T), then that pattern is frozen while P, lambda and Q keep training).
"""

import operator

import torch

from minilora.importance import ImportanceTracker, triplet_score


def cubic_budget(step, b0, bT, t_init, t_final, total_steps):
    """b(t): b0 up to t_init, then bT + (b0 - bT)(1 - (t - t_init)/(T - t_init - t_final))^3 rounded down,
    then bT from T - t_final on. Rounding down (int) is what peft does."""
    if not 0 <= bT <= b0:
        raise ValueError(f"the budget must shrink: need 0 <= bT <= b0, got b0={b0}, bT={bT}")
    if min(t_init, t_final) < 0 or t_init >= total_steps - t_final:
        raise ValueError(
            f"t_init={t_init}, t_final={t_final}, total_steps={total_steps} leave no budget phase: need "
            "0 <= t_init < total_steps - t_final; lower t_init or t_final, or raise total_steps"
        )
    if step <= t_init:
        return b0
    if step > total_steps - t_final:
        return bT
    progress = (step - t_init) / (total_steps - t_final - t_init)
    return int(bT + (b0 - bT) * (1 - progress) ** 3)


def svd_adapters(model):
    """Every module of model that carries an SVD adapter (parameters P, lam, Q), by name, in model order."""
    return {
        name: module
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, key, None), torch.nn.Parameter) for key in ("P", "lam", "Q"))
    }


def top_b_mask(scores, budget):
    """Keep exactly `budget` entries: the highest scores, ties going to the earlier entry (deterministic)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores, descending=True, stable=True).indices[:budget]] = True
    return keep


class RankAllocator:
    """Spends a shrinking rank budget on the SVD adapters of a model (AdaLoRA, eq. 8 and the cubic schedule).

    Call ``step(global_step)`` once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``,
    with global_step counting optimizer steps (0, 1, ..., at most total_steps). Only the singular values are
    masked; P and Q keep training, so a triplet pruned in the budget phase can earn its place back.
    """

    def __init__(self, model, config, tracker=None):
        self.adapters = svd_adapters(model)
        if not self.adapters:
            raise ValueError("the model has no SVD adapters (modules with P, lam, Q): call add_adalora first")
        if config.delta_t < 1:
            raise ValueError(f"delta_t={config.delta_t} must be at least 1 (mask every delta_t optimizer steps)")
        self.config = config
        self.b0 = sum(module.lam.numel() for module in self.adapters.values())
        self.bT = config.target_r * len(self.adapters)
        if self.bT > self.b0:
            raise ValueError(
                f"target_r={config.target_r} exceeds the adapters' average initial rank "
                f"({self.b0 / len(self.adapters):g}): choose target_r <= init_r"
            )
        self.final_step = config.total_steps - config.t_final
        cubic_budget(0, self.b0, self.bT, config.t_init, config.t_final, config.total_steps)  # validates
        self.tracker = tracker if tracker is not None else ImportanceTracker(config.beta1, config.beta2)
        self.last_step = None
        self.budget = self.b0
        self.finalized = False  # has the final mask been taken?
        self.rank_pattern = {name: [True] * module.lam.numel() for name, module in self.adapters.items()}
        self.rank_history = []  # one {"step", "budget", "ranks"} entry per mask taken

    @property
    def ranks(self):
        """{module name: number of kept triplets} of the current pattern."""
        return {name: sum(kept) for name, kept in self.rank_pattern.items()}

    def step(self, global_step):
        global_step = self._check_step(global_step)
        config = self.config
        self.budget = cubic_budget(
            global_step, self.b0, self.bT, config.t_init, config.t_final, config.total_steps
        )
        if global_step < self.final_step:
            self._update_scores()
            if global_step > config.t_init and global_step % config.delta_t == 0:
                self._mask(global_step)
        elif not self.finalized:
            # the final mask uses the scores as they stand (no update), then freezes the pattern for good
            self._mask(global_step)
            self.finalized = True
            self.tracker.reset()
        else:
            self._apply(self.rank_pattern)
        self.last_step = global_step

    def _check_step(self, global_step):
        try:
            global_step = operator.index(global_step)
        except TypeError:
            raise TypeError(f"global_step={global_step!r} must be an int (the optimizer step count)") from None
        if global_step < 0:
            raise ValueError(f"global_step={global_step} must be >= 0 (the optimizer step count)")
        if global_step > self.config.total_steps:
            raise ValueError(
                f"global_step={global_step} is beyond total_steps={self.config.total_steps}: count optimizer steps, "
                "not micro-batches (with gradient accumulation call step() once per optimizer.step()), or raise "
                "total_steps in the config"
            )
        if self.last_step is not None and global_step <= self.last_step:
            raise ValueError(
                f"step({global_step}) after step({self.last_step}): call step() once per optimizer step with an "
                "increasing global_step"
            )
        if global_step < self.final_step:
            for name, module in self.adapters.items():
                for key in ("P", "lam", "Q"):
                    if getattr(module, key).grad is None:
                        raise ValueError(
                            f"{name}.{key} has no gradient: call allocator.step() after optimizer.step() and "
                            "before optimizer.zero_grad() (zero_grad(set_to_none=True) deletes the gradients "
                            "the importance scores need)"
                        )
        return global_step

    def _update_scores(self):
        for name, module in self.adapters.items():
            for key in ("P", "lam", "Q"):
                weight = getattr(module, key)
                self.tracker.update(f"{name}.{key}", weight, weight.grad)

    def _scores(self):
        score = self.tracker.score
        return [
            triplet_score(score(f"{name}.P"), score(f"{name}.lam"), score(f"{name}.Q")) for name in self.adapters
        ]

    def _mask(self, global_step):
        scores = self._scores()
        keep = top_b_mask(torch.cat(scores), self.budget).split([s.numel() for s in scores])
        pattern = {name: kept.tolist() for name, kept in zip(self.adapters, keep, strict=True)}
        self._apply(pattern)
        self.rank_pattern = pattern
        self.rank_history.append({"step": global_step, "budget": self.budget, "ranks": self.ranks})

    @torch.no_grad()
    def _apply(self, pattern):
        for name, module in self.adapters.items():
            kept = torch.tensor(pattern[name], dtype=torch.bool, device=module.lam.device)
            module.lam.masked_fill_(~kept.view_as(module.lam), 0.0)

    def state_dict(self):
        return {
            "last_step": self.last_step,
            "budget": self.budget,
            "finalized": self.finalized,
            "rank_pattern": {name: list(kept) for name, kept in self.rank_pattern.items()},
            "rank_history": [dict(entry, ranks=dict(entry["ranks"])) for entry in self.rank_history],
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state):
        if set(state["rank_pattern"]) != set(self.adapters):
            raise ValueError(
                f"the saved allocator covers {sorted(state['rank_pattern'])} but this model's adapters are "
                f"{sorted(self.adapters)}: load it into the same model architecture and target_modules"
            )
        self.last_step, self.budget, self.finalized = state["last_step"], state["budget"], state["finalized"]
        self.rank_pattern = {name: list(kept) for name, kept in state["rank_pattern"].items()}
        self.rank_history = [dict(entry, ranks=dict(entry["ranks"])) for entry in state["rank_history"]]
        self.tracker.load_state_dict(state["tracker"])
