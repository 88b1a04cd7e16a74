"""Online hard-negative mining on a step's logits: selection among each row's candidates
(hardest-k, semi-hard) and the cross-batch memory bank."""

from .miners import SELECTIONS, MemoryBank, select_candidates

__all__ = ["SELECTIONS", "MemoryBank", "select_candidates"]
