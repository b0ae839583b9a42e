"""Low-rank factorization and efficient-architecture rewrites.

Tensor functions (layer 1): :func:`svd_factorize`, :func:`tucker2`, :func:`cp`,
:func:`spatial_svd`, :func:`separable_factors`; rank selection: :func:`energy_rank`,
:func:`vbmf`; the verb (layer 3): :func:`factorize_` with a :class:`FactorizeConfig`.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.lowrank import FactorizeConfig, factorize_
    >>> model = ts.create_model("zoo:conv2", input_shape=(1, 16, 16))
    >>> plan = factorize_(model, FactorizeConfig(method="tucker", rank=0.25))
    >>> [x.name for x in plan.layers]
    ['features.2']
"""

from torchslim.lowrank import _cli  # noqa: E402,F401  (registers the lowrank CLI verbs)
from torchslim.lowrank._plan import geometry as layer_geometry  # noqa: I001  (public: search costs layers with it)
from torchslim.lowrank.api import (
    METHODS,
    FactorizeConfig,
    FactorizePlan,
    LayerFactorization,
    SkippedLayer,
    factorize_,
)
from torchslim.lowrank.cp import cp, cp_max_rank, cp_reconstruct
from torchslim.lowrank.ranks import VBMFResult, energy_rank, vbmf, vbmf_rank
from torchslim.lowrank.separable import separable_factors, separable_reconstruct
from torchslim.lowrank.spatial import spatial_reconstruct, spatial_svd
from torchslim.lowrank.svd import svd_factorize, svd_reconstruct
from torchslim.lowrank.tucker import tucker2, tucker2_reconstruct

__all__ = [
    "METHODS",
    "FactorizeConfig",
    "FactorizePlan",
    "LayerFactorization",
    "SkippedLayer",
    "VBMFResult",
    "cp",
    "cp_max_rank",
    "cp_reconstruct",
    "energy_rank",
    "factorize_",
    "layer_geometry",
    "separable_factors",
    "separable_reconstruct",
    "spatial_reconstruct",
    "spatial_svd",
    "svd_factorize",
    "svd_reconstruct",
    "tucker2",
    "tucker2_reconstruct",
    "vbmf",
    "vbmf_rank",
]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
