"""Reward functions for math RL (accuracy, format, length) and a neural reward model wrapper.

Filled in by the issue "Recipes, reward models and the offline demo"; every function follows TRL's contract
`f(prompts, completions, completion_ids, **columns) -> list[float | None]`.
"""
