"""Deep-Compression packing: trained weight sharing, entropy coding, one ``.tslim`` file.

- :func:`cluster_`: per-layer k-means codebooks (``2**bits`` shared values; pruned zeros stay
  zero), trainable with ``ts.fit`` / ``ts.distill`` (gradients summed per cluster).
- :func:`pack` / :func:`unpack`: the clustered model as codebooks plus ANS- (or Huffman-) coded
  index and relative-position streams, checksummed; unpacked bit-exactly.
- :func:`packed_size_bytes`: the packed size, for profiles and reports.
"""

from torchslim.pack import _cli  # noqa: E402,F401  (registers the pack CLI verbs)
from torchslim.pack.api import (
    PackResult,
    pack,
    pack_result,
    packed_size_bytes,
    packed_size_if_clustered,
    read_header,
    unpack,
)
from torchslim.pack.cluster import (
    ClusterConfig,
    ClusterPlan,
    bake_,
    bake_clusters,
    cluster_,
    clustered_layers,
    kmeans_1d,
)
from torchslim.profile import register_size_estimator

register_size_estimator("packed_bytes", packed_size_if_clustered)  # ts.profile's packed_bytes

__all__ = [
    "ClusterConfig",
    "ClusterPlan",
    "PackResult",
    "bake_",
    "bake_clusters",
    "cluster_",
    "clustered_layers",
    "kmeans_1d",
    "pack",
    "pack_result",
    "packed_size_bytes",
    "read_header",
    "unpack",
]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
