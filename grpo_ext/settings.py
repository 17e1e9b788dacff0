"""The checks of a `GRPOExtConfig` that need another module's knowledge, run together at trainer start.

A config checks each field against itself and its other fields when it is built (`GRPOExtConfig.__post_init__`). A
rule that needs a table of another module (its loss types, KL estimators, reference modes, reward policies, memory
sizes, ...) lives in that module, beside the table, as `check_<topic>_settings(args)`; `check_settings` runs them all.
`GRPOExtTrainer.__init__` calls it first thing, and so does the recipe's parser, so a recipe and
`python -m grpo_ext.doctor` fail before any data or model is loaded. Building a config imports none of these modules.
"""

from __future__ import annotations

from .advantages import check_advantage_settings
from .cpu import check_cpu_settings
from .data import check_eval_batch
from .models import check_model_settings
from .objective import check_objective_settings
from .plan import check_memory_settings
from .reference import check_reference_settings
from .reward_scoring import check_reward_settings

# In the order a reader meets the fields: model, objective, advantages, rewards, reference, memory, hardware.
SETTINGS_CHECKS = (
    check_model_settings,
    check_objective_settings,
    check_advantage_settings,
    check_reward_settings,
    check_reference_settings,
    check_memory_settings,
    check_cpu_settings,
)


def check_settings(args) -> None:
    """Run every module's check of `args` (a `GRPOExtConfig`): raises `ValueError` naming the field and the fix, and
    gives the warnings `trl.GRPOTrainer` gives at start."""
    for check in SETTINGS_CHECKS:
        check(args)
    if args.do_eval and args.eval_strategy != "no":  # as TRL; the trainer checks again when given eval data
        check_eval_batch(args)
