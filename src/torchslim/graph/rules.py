"""The op loop: every op of a trace through its rule, in order.

The rules are looked up by the op's *packet* (its ATen name without overload): layers
(:mod:`~torchslim.graph.rules_layers`), views and slices (:mod:`~torchslim.graph.rules_shape`),
generic kinds (:mod:`~torchslim.graph.rules_elementwise`). An op no table names is elementwise
when it is pointwise (:func:`~torchslim.graph.optable.is_pointwise`), frozen when it makes no
floating tensor, and otherwise :func:`~torchslim.graph.rules_elementwise.unknown` (an error when
it touches live channels).
Attention and recurrent modules are taken as a whole (:mod:`~torchslim.graph.rules_modules`).
"""

from __future__ import annotations

from torchslim._select import matches
from torchslim.graph import rules_elementwise, rules_layers, rules_shape
from torchslim.graph.analyser import Analyser, Rule
from torchslim.graph.optable import is_pointwise
from torchslim.graph.rules_elementwise import elementwise, frozen_op, unknown
from torchslim.graph.rules_modules import attention_call, module_constraints, rnn_call
from torchslim.graph.tracer import OpNode

__all__ = ["RULES", "rule_for", "run"]

RULES: dict[str, Rule] = {**rules_layers.RULES, **rules_shape.RULES, **rules_elementwise.RULES}


def rule_for(op: OpNode) -> Rule:
    """The rule that analyses ``op``."""
    rule = RULES.get(op.packet)
    if rule is not None:
        return rule
    if is_pointwise(op.func):
        return elementwise
    if not any(o.is_floating for o in op.outputs) and op.outputs:
        return frozen_op
    return unknown


def run(a: Analyser) -> None:
    """Apply every op of ``a``'s trace to it, then freeze the model's outputs and the modules
    whose widths must stay whole; parameters no rule made a channel are marked whole (None)."""
    tr = a.tr
    for t in tr.inputs:
        a.layouts[t.id] = a.opaque_layout(t.shape)
    calls = {c.first_op: c for c in tr.module_calls if c.name in a.mha and c.last_op >= c.first_op}
    if calls:
        for op in tr.ops:
            for t in op.tensor_args():
                a.last_use[t.id] = op.index
        a.output_ids = {t.id for t in tr.outputs}
    skip = -1
    skipped: dict[str, bool] = {}  # module -> whether a skip pattern selects it (asked once per module)
    for op in tr.ops:
        if op.index <= skip:
            continue
        if a.ignore and skipped.setdefault(op.module, any(matches(op.module, p) for p in a.ignore)):
            a.opaque_op(op)
            continue
        call = calls.get(op.index)
        if call is not None:
            if a.mha[call.name].get("kind") == "rnn":
                rnn_call(a, call)
            else:
                attention_call(a, call)
            skip = call.last_op
            continue
        rule_for(op)(a, op)
    for t in tr.outputs:
        a.freeze(t)
    module_constraints(a)
    for name in list(a.param_atoms):
        a.param_atoms[name] = [d if (d is not None and len(d) > 0) else None for d in a.param_atoms[name]]
