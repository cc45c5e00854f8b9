"""Pruning methods. Each is selected by a `conf/prune/*.yaml` whose `_target_` names its class."""

from cspexp.pruning.methods.base import NoPruning, PruningContext, PruningMethod

__all__ = ["NoPruning", "PruningContext", "PruningMethod"]
