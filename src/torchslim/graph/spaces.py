"""Channel spaces: which indices of which parameters must be removed together.

The analysis is split into parts (read them in this order): :mod:`~torchslim.graph.unionfind`,
:mod:`~torchslim.graph.analyser` (atoms, layouts, the algebra the rules use),
``rules_layers`` / ``rules_shape`` / ``rules_elementwise`` / ``rules_modules`` (one rule per ATen
op or module kind), :mod:`~torchslim.graph.rules` (the op loop), :mod:`~torchslim.graph.build`
(:func:`analyse`, :func:`groups`) and :mod:`~torchslim.graph.channel_groups` (the result).
:mod:`~torchslim.graph.meta` holds the shape-only copies. This module keeps the names it always
exported, so ``from torchslim.graph.spaces import analyse`` goes on working.
"""

from __future__ import annotations

from torchslim.graph.build import analyse, groups
from torchslim.graph.channel_groups import ChannelGroup, ChannelGroups
from torchslim.graph.meta import meta_copy, params_on_meta, to_meta

__all__ = ["ChannelGroup", "ChannelGroups", "analyse", "groups", "meta_copy", "params_on_meta", "to_meta"]
