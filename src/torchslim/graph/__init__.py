"""The dispatch-level tracer (and, as it lands, channel-space analysis and surgery)."""

from torchslim.graph.inputs import Inputs, as_inputs, call_model
from torchslim.graph.tracer import ModuleCall, OpNode, TensorMeta, Trace, trace
from torchslim.graph.spaces import ChannelGroup, ChannelGroups, groups

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "groups",
    "Inputs", "ModuleCall", "OpNode", "TensorMeta", "Trace", "as_inputs", "call_model", "trace"]
