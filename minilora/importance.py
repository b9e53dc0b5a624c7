"""Importance scores of AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512), section 3.2.

For every trainable entry w of an SVD adapter (P, lambda, Q):

- sensitivity     I_t = |w * dL/dw|                               (eq. 10)
- smoothed        Ibar_t = beta1 Ibar_{t-1} + (1 - beta1) I_t       (eq. 11)
- uncertainty     Ubar_t = beta2 Ubar_{t-1} + (1 - beta2) |I_t - Ibar_t|   (eq. 12, with the updated Ibar_t)
- element score   s = Ibar_t * Ubar_t                              (eq. 13)

and the score of triplet i of one adapter adds its singular value's score to the mean scores of its column of P
and its row of Q (eq. 9). Scores are taken after optimizer.step(): the updated weight times that step's gradient,
which is the order peft uses, so the two libraries rank triplets identically.
"""

import torch


def sensitivity(weight, grad):
    """Eq. 10: how much the loss would change if this entry were zeroed, to first order: |w * dL/dw|."""
    return (weight * grad).abs()


class ImportanceTracker:
    """Exponential moving averages of the sensitivity (eq. 11) and of its uncertainty (eq. 12), per named tensor.

    ``update(name, weight, grad)`` once per optimizer step for each tracked tensor; ``score(name)`` gives the
    element scores of eq. 13, a tensor shaped like the weight.
    """

    def __init__(self, beta1=0.85, beta2=0.85):
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < beta < 1.0:
                raise ValueError(f"{label}={beta} must lie strictly between 0 and 1 (the paper uses 0.85)")
        self.beta1, self.beta2 = beta1, beta2
        self.reset()

    def reset(self):
        """Forget every score (AdaLoRA does this once the rank pattern is final)."""
        self.sensitivity = {}  # I_t of the latest step, eq. 10
        self.smoothed = {}  # Ibar, eq. 11
        self.uncertainty = {}  # Ubar, eq. 12

    @torch.no_grad()
    def update(self, name, weight, grad):
        if grad is None:
            raise ValueError(
                f"no gradient for {name}: update importance scores after loss.backward() and optimizer.step(), "
                "before optimizer.zero_grad()"
            )
        current = sensitivity(weight.detach(), grad)
        smoothed = self.smoothed.get(name, torch.zeros_like(current))
        uncertainty = self.uncertainty.get(name, torch.zeros_like(current))
        smoothed = self.beta1 * smoothed + (1 - self.beta1) * current
        # eq. 12 measures the distance to the average that already includes this step
        uncertainty = self.beta2 * uncertainty + (1 - self.beta2) * (current - smoothed).abs()
        self.sensitivity[name], self.smoothed[name], self.uncertainty[name] = current, smoothed, uncertainty

    def score(self, name):
        """Eq. 13: an entry matters when it is sensitive on average AND its sensitivity is uncertain."""
        if name not in self.smoothed:
            raise KeyError(f"no importance scores for {name} yet: call update() at least once first")
        return self.smoothed[name] * self.uncertainty[name]

    def state_dict(self):
        return {
            "beta1": self.beta1,
            "beta2": self.beta2,
            **{
                key: {name: t.clone() for name, t in getattr(self, key).items()}
                for key in ("sensitivity", "smoothed", "uncertainty")
            },
        }

    def load_state_dict(self, state):
        if (state["beta1"], state["beta2"]) != (self.beta1, self.beta2):
            raise ValueError(
                f"the saved scores use beta1={state['beta1']}, beta2={state['beta2']} but this tracker has "
                f"beta1={self.beta1}, beta2={self.beta2}: build it with the saved values"
            )
        for key in ("sensitivity", "smoothed", "uncertainty"):
            setattr(self, key, {name: t.clone() for name, t in state[key].items()})


def triplet_score(score_P, score_lam, score_Q):
    """Eq. 9: the score of triplet i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij).

    score_P is [out, r], score_lam [r], score_Q [r, in] (element scores, eq. 13); returns [r].
    """
    return score_lam + (score_Q.mean(dim=1) + score_P.mean(dim=0))
