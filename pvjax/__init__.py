"""pvjax: persona vectors in JAX.

Extract trait directions from a model's residual stream, monitor them, and steer with them. Models
are pure functions over parameter pytrees; interventions and captures are data passed to `forward`.
"""

from pvjax import moved  # old module paths (pvjax.generate, pvjax.vectors, ...) keep working
from pvjax.capture import Capture, ForwardOutput, Routing, activations_only, pooling_weights
from pvjax.interventions import Intervention
from pvjax.model import Model, activations, forward, load
from pvjax.models.config import ModelConfig
from pvjax.version import __version__


def __getattr__(name):
    return moved.attribute(name)


__all__ = [
    "Capture",
    "ForwardOutput",
    "Routing",
    "Intervention",
    "Model",
    "ModelConfig",
    "activations",
    "activations_only",
    "forward",
    "load",
    "pooling_weights",
    "__version__",
]
