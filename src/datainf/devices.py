"""Which devices can be computed on here: one check for the commands (--device) and the
library (``device=``), answered before any work."""

from __future__ import annotations

import torch

from .errors import DataInfError
from .options import said


def check_device(device: str | torch.device) -> None:
    """Refuse a device torch does not know or this machine does not have (the message names
    it as whoever set it typed it: ``--device`` or ``device=``)."""
    named, quoted = said("device", str(device)), said("device", str(device), quoted=True)
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataInfError(f"{quoted} is not a device name; use cpu, cuda or cuda:N") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise DataInfError(f"{named}: this torch has no CUDA device (build "
                               f"{torch.__version__}); use cpu, or install a CUDA build of "
                               "torch")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise DataInfError(f"{named}: there are only {torch.cuda.device_count()} CUDA "
                               "devices")
    elif where.type not in ("cpu", "mps"):
        raise DataInfError(f"{quoted}: only cpu and cuda are supported")
