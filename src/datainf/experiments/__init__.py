"""The paper's studies as commands (``datainf experiment NAME``), built from the
detect-mislabeled pipeline and sharing its cached fine-tunes and gradient stores.

- ``approximation``: each method's correlation with Exact across LoRA ranks (paper, Figure 1);
- ``mislabeled``: AUC of every score over runs and the influence step's runtime (Figure 2 and
  the runtime comparison);
- ``removal``: validation accuracy after removing each method's most suspicious examples and
  fine-tuning again, against removing as many at random.
"""

from . import approximation, mislabeled, removal
from .common import Settings

EXPERIMENTS = {"approximation": approximation.run, "mislabeled": mislabeled.run,
               "removal": removal.run}

__all__ = ["EXPERIMENTS", "Settings"]
