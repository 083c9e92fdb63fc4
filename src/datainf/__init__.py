"""datainf: which training examples made a LoRA fine-tuned model do what it does.

Sign convention (the paper's): a positive influence score means that up-weighting the training
example increases the test loss (the example is harmful); the most helpful examples have the
most negative scores.
"""

from .errors import DataInfError
from .gradients.collect import collect_gradients
from .gradients.store import GradientStore
from .methods import (
    Convergence,
    DataInf,
    Exact,
    HessianFree,
    InfluenceEstimator,
    Less,
    LiSSA,
    RepSim,
)
from .methods.damping import Damping

__all__ = [
    "Convergence",
    "DataInf",
    "DataInfError",
    "Damping",
    "Exact",
    "GradientStore",
    "collect_gradients",
    "HessianFree",
    "InfluenceEstimator",
    "Less",
    "LiSSA",
    "RepSim",
]

__version__ = "0.1.0"
