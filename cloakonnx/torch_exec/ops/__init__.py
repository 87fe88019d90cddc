"""The op handlers, one module per op family; importing this package registers them all.

Each family module imports only the registry, the tensor helpers and (conv and pool) the shared
window geometry in spatial.py; none imports another family.
"""
from __future__ import annotations

from . import (  # noqa: F401 - imported for their registrations
    constant,
    control,
    conv,
    elementwise,
    indexing,
    norm,
    pad,
    pool,
    quant,
    reduce,
    resize,
    shape,
    softmax,
)
