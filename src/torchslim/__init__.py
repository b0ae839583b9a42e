"""torchslim: deep-model compression for PyTorch, measured honestly and shipped to real runtimes.

The public surface is the names below; everything else is reachable through the subpackages
(``torchslim.graph``, ``torchslim.profile``, ``torchslim.data``, ``torchslim.zoo``, ...).

Example:
    >>> import torchslim as ts
    >>> model = ts.create_model("zoo:lenet300", data="mnist")
    >>> ts.profile(model, latency=False).macs
    266200
"""

from torchslim import errors
from torchslim._finalize import finalize_
from torchslim._registry import list_methods
from torchslim.binarize import BinarizeConfig, BinarizePlan, binarize_
from torchslim.data import DataBundle, list_datasets, load_data
from torchslim.distill import DistillConfig, DistillResult, HealResult, distill, heal_
from torchslim.errors import TorchslimError
from torchslim.export import ExportError, ExportResult, ParityError, Tolerance, bench, export
from torchslim.graph import trace
from torchslim.lm import Generation, LMSpeed, PerplexityResult, evaluate_lm, generate, lm_speed
from torchslim.lowrank import FactorizeConfig, FactorizePlan, factorize_
from torchslim.pack import ClusterConfig, ClusterPlan, PackResult, bake_, cluster_, pack, unpack
from torchslim.profile import Comparison, Profile, compare, profile
from torchslim.prune import (
    Budget,
    LotteryConfig,
    MaskCallback,
    OneShotConfig,
    PruneConfig,
    SparsifyConfig,
    block_influence,
    prune_channels_,
    prune_llm_,
    remove_layers_,
    run_lottery,
    sparsegpt_,
    sparsify_,
    sparsity_report,
    wanda_,
)
from torchslim.quantize import QuantConfig, QuantPlan, gptq_, qat_convert_, qat_prepare_, quantize_
from torchslim.recipe import CompressResult, Recipe, compress, list_recipes, load_recipe
from torchslim.saving import load, save
from torchslim.search import SearchConfig, SearchResult, search
from torchslim.train import Callback, TrainConfig, TrainResult, evaluate, fit
from torchslim.zoo import create_model, example_inputs, list_models, set_example_inputs

__version__ = "0.1.0"

__all__ = [
    "BinarizeConfig",
    "BinarizePlan",
    "binarize_",
    "Budget",
    "LotteryConfig",
    "MaskCallback",
    "PruneConfig",
    "SparsifyConfig",
    "finalize_",
    "prune_channels_",
    "prune_llm_",
    "block_influence",
    "remove_layers_",
    "run_lottery",
    "sparsify_",
    "sparsity_report",
    "OneShotConfig",
    "sparsegpt_",
    "wanda_",
    "gptq_",
    "Callback",
    "Comparison",
    "DataBundle",
    "DistillConfig",
    "DistillResult",
    "FactorizeConfig",
    "FactorizePlan",
    "factorize_",
    "distill",
    "HealResult",
    "heal_",
    "Profile",
    "QuantConfig",
    "QuantPlan",
    "qat_convert_",
    "qat_prepare_",
    "quantize_",
    "TorchslimError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "compare",
    "ClusterConfig",
    "ClusterPlan",
    "PackResult",
    "bake_",
    "cluster_",
    "pack",
    "unpack",
    "compress",
    "CompressResult",
    "Recipe",
    "list_recipes",
    "load_recipe",
    "create_model",
    "errors",
    "export",
    "bench",
    "ExportError",
    "ExportResult",
    "ParityError",
    "Tolerance",
    "evaluate",
    "evaluate_lm",
    "generate",
    "lm_speed",
    "Generation",
    "LMSpeed",
    "PerplexityResult",
    "example_inputs",
    "fit",
    "list_datasets",
    "list_methods",
    "list_models",
    "load",
    "load_data",
    "profile",
    "save",
    "search",
    "SearchConfig",
    "SearchResult",
    "set_example_inputs",
    "trace",
]


def __getattr__(name: str) -> object:
    # moved modules keep their old names for one release
    if name == "distributed":
        import warnings

        from torchslim.train import distributed

        warnings.warn("torchslim.distributed moved to torchslim.train.distributed", DeprecationWarning, stacklevel=2)
        return distributed
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")
