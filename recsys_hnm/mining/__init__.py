"""Online hard-negative mining on a step's logits: selection among each row's candidates
(hardest-k, semi-hard) and the cross-batch memory bank."""

from .miners import SELECTIONS, MemoryBank, candidate_scores, left_out_centroid_term, left_out_item_side_term, left_out_term, select_candidates

__all__ = ["SELECTIONS", "MemoryBank", "candidate_scores", "left_out_centroid_term", "left_out_item_side_term", "left_out_term", "select_candidates"]
