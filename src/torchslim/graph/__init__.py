"""The dispatch-level tracer, the channel-space analysis and surgery.

``trace`` records every ATen op of one eager forward (:mod:`~torchslim.graph.tracer`);
``groups`` finds the channels that must be removed together (:mod:`~torchslim.graph.build` and
its parts, listed in :mod:`~torchslim.graph.spaces`); :mod:`~torchslim.graph.surgery` cuts them.
"""

from torchslim.graph.build import analyse, groups
from torchslim.graph.channel_groups import ChannelGroup, ChannelGroups
from torchslim.graph.inputs import Inputs, as_inputs, call_model
from torchslim.graph.tracer import ModuleCall, OpNode, TensorMeta, Trace, trace

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "analyse",
    "groups",
    "Inputs", "ModuleCall", "OpNode", "TensorMeta", "Trace", "as_inputs", "call_model", "trace"]
