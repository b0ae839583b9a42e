"""Pruning: masks and unstructured / N:M sparsity, schedules, lottery tickets (and structured pruning).

Example:
    >>> import torchslim as ts
    >>> from torchslim.prune import sparsify_
    >>> model = ts.create_model("zoo:lenet300")
    >>> sparsify_(model, pattern="2:4").overall
    0.5
"""

# --- unstructured sparsity ---
# --- structured (channel) pruning ---
from torchslim.prune.channels import ChannelPlan, prune_channels_
from torchslim.prune.config import Budget, PruneConfig, SparsifyConfig
from torchslim.prune.importance import GroupImportance, get_importance
from torchslim.prune.lottery import LotteryConfig, LotteryResult, find_ticket, run_lottery
from torchslim.prune.masks import (
    MaskCallback,
    SparsityPlan,
    SparsityReport,
    WeightMask,
    finalize_,
    get_mask,
    masked_weights,
    prunable_weights,
    reapply_masks_,
    set_masks_,
    sparsify_,
    sparsity_report,
)
from torchslim.prune.schedules import (
    AGP,
    ConstantSparsity,
    IterativePruning,
    OneShotPruning,
    PolynomialDecay,
    PruningSchedule,
)
from torchslim.prune.unstructured import LAMP, SNIP, Magnitude, Movement, RandomScores, Wanda

__all__ = [
    # --- structured (channel) pruning ---
    "Budget",
    "ChannelPlan",
    "GroupImportance",
    "PruneConfig",
    "get_importance",
    "prune_channels_",
    # --- unstructured sparsity ---
    "AGP",
    "ConstantSparsity",
    "IterativePruning",
    "LAMP",
    "LotteryConfig",
    "LotteryResult",
    "Magnitude",
    "MaskCallback",
    "Movement",
    "OneShotPruning",
    "PolynomialDecay",
    "PruningSchedule",
    "RandomScores",
    "SparsifyConfig",
    "SNIP",
    "SparsityPlan",
    "SparsityReport",
    "Wanda",
    "WeightMask",
    "finalize_",
    "find_ticket",
    "get_mask",
    "masked_weights",
    "prunable_weights",
    "reapply_masks_",
    "run_lottery",
    "set_masks_",
    "sparsify_",
    "sparsity_report",
]

# --- post-training (one-shot) pruning and transformer structure (heads, FFN neurons, layers) ---
from torchslim.prune import _cli  # noqa: E402,F401  (registers the prune CLI verbs)
from torchslim.prune._sparse_kernels import CSRLinear, to_csr_inference  # noqa: E402
from torchslim.prune.activation import ActivationImportance  # noqa: E402
from torchslim.prune.depth import block_influence, remove_layers_  # noqa: E402
from torchslim.prune.heads import (  # noqa: E402
    drop_layers_,
    head_importance,
    neuron_importance,
    prune_ffn_,
    prune_ffn_by_importance_,
    prune_heads_,
    prune_heads_by_importance_,
)
from torchslim.prune.llm import LLMPrunePlan, prune_llm_  # noqa: E402
from torchslim.prune.sparsegpt import sparsegpt_  # noqa: E402
from torchslim.prune.wanda import OneShotConfig, wanda_  # noqa: E402

__all__ += [
    "CSRLinear",
    "to_csr_inference",
    "ActivationImportance",
    "LLMPrunePlan",
    "OneShotConfig",
    "block_influence",
    "drop_layers_",
    "head_importance",
    "neuron_importance",
    "prune_ffn_",
    "prune_ffn_by_importance_",
    "prune_heads_",
    "prune_heads_by_importance_",
    "prune_llm_",
    "remove_layers_",
    "sparsegpt_",
    "wanda_",
]


def _finalize_masks(model: "nn.Module", storage: str = "auto") -> SparsityReport | None:  # noqa: F821,UP037
    """Bake pruning masks into their weights, stored sparse (``finalize_``); None without masks."""
    if not masked_weights(model):  # nothing to bake: check ``storage`` only (the model may have no
        from torchslim.errors import ConfigError  # Linear/Conv left to report on, e.g. all int8 layers)
        from torchslim.prune._sparse_io import FORMATS

        if storage not in FORMATS:
            raise ConfigError(f"storage must be one of {', '.join(FORMATS)}; got {storage!r}")
        return None
    return finalize_(model, storage)


def _register_finalizer() -> None:
    from torchslim._finalize import register_finalizer

    register_finalizer("masks", _finalize_masks, family="prune", order=30, options=("storage",))


_register_finalizer()

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
