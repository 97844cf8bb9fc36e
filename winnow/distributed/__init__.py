"""Tensor parallel over torch.distributed: the group, the parallel layers, the worker ranks.

Rank 0 is the engine thread (it alone schedules, applies grammars and samples); ranks
1..N-1 are worker processes that run the forward pass on the flat step input rank 0
broadcasts each step (`step_input`), and hand their slice of the logits back to rank 0.
(Nothing is imported here: the command line reads `layout` without loading torch.)
"""
