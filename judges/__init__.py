"""tailmon.judges: harm scorers mapping (prompt, response) pairs to [0, 1].

Build one from a spec string (`parse_judge("any(toxicity>=0.5; prefix:Sure, here is)")`); the
grammar is documented in `tailmon.judges.spec`, the contract in `tailmon.judges.base`. After
scoring, `judge.warnings()` lists what a report should say about the scores (LLM-judge answers
that were not digits, endpoint replies without log-probs). The model-backed judges (`llm:`,
`classifier:`, `endpoint:`) load their models or reach their servers on the first `score`.
"""

from .base import Judge
from .spec import describe_judges, parse_judge

__all__ = ["Judge", "describe_judges", "parse_judge"]
