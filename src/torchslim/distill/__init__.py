"""Knowledge distillation: train a small or compressed student against a frozen teacher.

``distill(student, teacher, data, DistillConfig(...))`` runs the shared train loop
(:func:`torchslim.train.fit`, so callbacks, checkpoints, resume and ``torchrun`` data parallelism
all work) with a registered loss: Hinton KD (``"kd"``), FitNets hints (``"hint"``), attention
transfer (``"at"``) or TinyBERT layer matching (``"tinybert"``). ``heal_(student, teacher, data)``
heals a pruned decoder LLM from its unpruned original on training text under a wall-clock budget
(logits KD + hidden states, resumable, optionally through LoRA adapters merged back).
"""

from torchslim.distill import _cli  # noqa: E402,F401  (registers the distill CLI verbs)
from torchslim.distill.api import DistillConfig, DistillResult, distill
from torchslim.distill.heal import HealResult, heal_
from torchslim.distill.lora import LoRALinear, add_lora_, merge_lora_, remove_lora_
from torchslim.distill.losses import ATLoss, DistillLoss, HintLoss, KDLoss, TinyBERTLoss, kd_loss
from torchslim.distill.mapping import auto_taps, map_by_depth, map_by_name
from torchslim.distill.taps import FeatureTaps
from torchslim.distill.tinybert import HiddenDistillResult, default_layer_map, distill_hidden_

__all__ = [
    "HealResult",
    "HiddenDistillResult",
    "LoRALinear",
    "add_lora_",
    "heal_",
    "merge_lora_",
    "remove_lora_",
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
