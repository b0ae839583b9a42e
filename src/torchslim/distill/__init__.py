"""Knowledge distillation: train a small or compressed student against a frozen teacher.

``distill(student, teacher, data, DistillConfig(...))`` runs the shared train loop
(:func:`torchslim.train.fit`, so callbacks, checkpoints, resume and ``torchrun`` data parallelism
all work) with a registered loss: Hinton KD (``"kd"``), FitNets hints (``"hint"``), attention
transfer (``"at"``) or TinyBERT layer matching (``"tinybert"``).
"""

from torchslim.distill import _cli  # noqa: E402,F401  (registers the distill CLI verbs)
from torchslim.distill.api import DistillConfig, DistillResult, distill
from torchslim.distill.losses import ATLoss, DistillLoss, HintLoss, KDLoss, TinyBERTLoss, kd_loss
from torchslim.distill.mapping import auto_taps, map_by_depth, map_by_name
from torchslim.distill.taps import FeatureTaps
from torchslim.distill.tinybert import HiddenDistillResult, default_layer_map, distill_hidden_

__all__ = [
    "HiddenDistillResult",
    "default_layer_map",
    "distill_hidden_",
    "ATLoss",
    "DistillConfig",
    "DistillLoss",
    "DistillResult",
    "FeatureTaps",
    "HintLoss",
    "KDLoss",
    "TinyBERTLoss",
    "auto_taps",
    "distill",
    "kd_loss",
    "map_by_depth",
    "map_by_name",
]

from torchslim._registry import import_modules as _import_modules  # noqa: E402

_import_modules(__name__, __path__)  # every public module registers what it defines: a new method is one new file
