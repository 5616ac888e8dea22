"""Batched runs: K runs that differ only in seed and learning rate, trained as one stacked model
(:func:`train_batched`), each with its own parameters, optimizer state, BN statistics, data order,
learning rate, stopping and RunResult. :func:`group_configs` cuts a sweep into such groups."""

from normlab.batched.engine import train_batched
from normlab.batched.grouping import MAX_GROUP, batch_key, can_batch, check_group, group_configs
from normlab.batched.policy import MemberPolicy
from normlab.batched.stack import StackedModel

__all__ = [
    "MAX_GROUP",
    "MemberPolicy",
    "StackedModel",
    "batch_key",
    "can_batch",
    "check_group",
    "group_configs",
    "train_batched",
]
