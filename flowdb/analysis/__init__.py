"""Experiments on a stored pack with its model, the fourth stage: a pack's SAEs in memory
(pack_model), activation groups, deactivation trials, steering, top-context labels and their
statistics."""
