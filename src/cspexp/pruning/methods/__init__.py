"""Pruning methods. Each is selected by a `conf/prune/*.yaml` whose `_target_` names its spec class
(a `PruningSpec`); ``spec.bind(num_layers, n_image)`` returns the `PruningMethod` the decoder loop runs."""

from cspexp.pruning.methods.base import NoPruning, PruningContext, PruningMethod, PruningSpec
from cspexp.pruning.methods.csp import ClusterScatterPrune
from cspexp.pruning.methods.dart import Dart
from cspexp.pruning.methods.divprune import DivPrune
from cspexp.pruning.methods.fastervlm import FasterVLM
from cspexp.pruning.methods.fastv import FastV
from cspexp.pruning.methods.mustdrop import MustDrop
from cspexp.pruning.methods.norm import NormDrop
from cspexp.pruning.methods.pdrop import PyramidDrop
from cspexp.pruning.methods.simple import RandomDrop, UniformDrop
from cspexp.pruning.methods.sparsevlm import SparseVLM
from cspexp.pruning.methods.tome import ToMe
from cspexp.pruning.methods.visionzip import VisionZip
from cspexp.pruning.methods.vtw import VisualTokenWithdrawal

__all__ = [
    "ClusterScatterPrune",
    "Dart",
    "DivPrune",
    "FasterVLM",
    "FastV",
    "MustDrop",
    "NoPruning",
    "NormDrop",
    "PruningContext",
    "PruningMethod",
    "PruningSpec",
    "PyramidDrop",
    "RandomDrop",
    "SparseVLM",
    "ToMe",
    "UniformDrop",
    "VisionZip",
    "VisualTokenWithdrawal",
]
