"""Direct Preference Optimization (Rafailov et al., 2023): learn from (prompt, chosen, rejected) without a reward
model. The loss raises the policy's log-probability of the chosen reply relative to the reference model's, more
than that of the rejected one:

    loss = -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

The reference is the base model itself: the policy with its LoRA adapters switched off (lora.adapters_disabled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import IGNORE


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
                  "margin": margin.detach(), "accuracy": (margin > 0).float().detach()}
