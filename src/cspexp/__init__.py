"""cspexp: visual-token pruning inside the LLM of reasoning-segmentation LVLMs (LISA family).

Stages of the data flow, one sub-package each (an arrow only points down this list):
``models`` → ``pruning`` → ``data`` → ``metrics`` → ``lit`` → ``outputs``; ``evaluate`` wires them and
``cli`` is the Hydra entry point.
"""

__version__ = "0.1.0"

from cspexp.models.packaged import register_resolvers as _register_resolvers

_register_resolvers()  # ${packaged:NAME} must resolve in every entry point's configs
