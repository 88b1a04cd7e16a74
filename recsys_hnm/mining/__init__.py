"""Online hard-negative mining on a step's logits: selection among each row's candidates
(hardest-k, semi-hard) and the cross-batch memory bank."""

from .miners import SELECTIONS, MemoryBank, left_out_term, select_candidates

__all__ = ["SELECTIONS", "MemoryBank", "left_out_term", "select_candidates"]
