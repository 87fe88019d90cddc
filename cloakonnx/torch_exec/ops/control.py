"""Control flow: If, the one control-flow op the executor runs.

The planner (plan.py, control.py) inlines an If whose condition is certain at plan time, so this
handler only runs the others: it reads the condition on the host (one sync) and runs the sub-plan
of the branch it picks, which the planner put in ``attrs`` in place of the branch graphs. The
versions after 1 change no tensor semantics: 11 lets the branches' output shapes differ, 13 and 16
add sequence and optional outputs (whose ops the executor lacks, so such graphs are refused), and
19 to 25 add element types.
"""
from __future__ import annotations

from ..registry import op


@op("If", 1, 11, 13, 16, 19, 21, 23, 24, 25)
def _if(inputs, attrs, ctx):
    taken = attrs["then_branch"] if bool(inputs[0].item()) else attrs["else_branch"]
    return taken.run(inputs[1:])
