"""Whether an op meets its issue's bars, judged on the rows this run measured or counted."""
from __future__ import annotations

import operator

from .workload import Workload

_OPS = {"<=": operator.le, ">=": operator.ge}


def evaluate(workload: Workload, quick: bool, sections: dict[str, list[dict]]) -> list[dict]:
    """Per bar: every selected (case, pass) value, the worst of them, and met (None if no row applies)."""
    cases = {c.name: c for c in workload.cases(quick)}
    out = []
    for bar in workload.bars:
        values = [{"case": r["case"], "pass": r["pass"], "value": r[bar.metric]}
                  for r in sections.get(bar.section, [])
                  if r["pass"] in bar.passes and r.get(bar.metric) is not None
                  and r["case"] in cases and bar.where(cases[r["case"]])]
        worst = None
        if values:
            pick = max if bar.op == "<=" else min
            worst = pick(v["value"] for v in values)
        out.append({"bar": bar.text, "section": bar.section, "metric": bar.metric, "op": bar.op,
                    "target": bar.target, "values": values, "worst": worst,
                    "met": None if worst is None else _OPS[bar.op](worst, bar.target)})
    return out
