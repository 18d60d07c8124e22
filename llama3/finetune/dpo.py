"""Direct Preference Optimization (Rafailov et al., 2023): learn from (prompt, chosen, rejected) without a reward
model. The loss raises the policy's log-probability of the chosen reply relative to the reference model's, more
than that of the rejected one:

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

The reference is the base model itself: the policy with its LoRA adapters switched off (lora.adapters_disabled).
`DPOLoss` is the objective the training loop runs; accuracy counts a pair whose margin is exactly 0 (as at the
start, where the policy is the reference) as half right: it ranks neither reply first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train.trainer import Batch
from .data import IGNORE
from .lora import adapters_disabled


def sequence_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over each row of log p(target) where the target is learned: (B, T, V), (B, T) -> (B,)."""
    learned = targets != IGNORE
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * learned).sum(dim=-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO loss over the pairs and, per pair, the implicit rewards beta * log(pi / ref) and their margin."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"chosen_reward": chosen_reward.detach(), "rejected_reward": rejected_reward.detach(),
                  "margin": margin.detach(), "accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).detach()}


class DPOLoss:
    """The loop's objective for preference pairs: a batch holds the chosen rows, then the rejected rows of the same
    pairs. Summed loss and statistics over the pairs; the reference runs without gradients. The policy's logits
    are needed whole over the vocabulary (no loss parallel), and the reference's pass does not fit a pipeline
    schedule (the config refuses parallel.pp)."""

    loss_parallel = False

    def __init__(self, beta: float):
        self.beta = beta
        self.policy: nn.Module | None = None  # the model whose adapters are switched off for the reference

    @staticmethod
    def real_pairs(batch: Batch) -> Tensor:
        """Which pairs are data: a batch padded to a fixed shape ends in pairs with nothing to learn."""
        return (batch.targets[:len(batch.inputs) // 2] != IGNORE).any(dim=-1)

    def count(self, batch: Batch) -> int:
        return int(self.real_pairs(batch).sum())

    def loss(self, forward, batch: Batch) -> tuple[Tensor, dict]:
        policy = sequence_logps(forward(batch), batch.targets)
        with torch.no_grad(), adapters_disabled(self.policy):
            reference = sequence_logps(forward(batch), batch.targets)
        real = self.real_pairs(batch)
        pairs = [half[real] for half in (*policy.chunk(2), *reference.chunk(2))]
        loss, stats = dpo_loss(*pairs, beta=self.beta)
        return loss * int(real.sum()), {k: v.sum() for k, v in stats.items()}
