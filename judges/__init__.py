"""tailmon.judges: harm scorers mapping (prompt, response) pairs to [0, 1].

Build one from a spec string (`parse_judge("any(toxicity>=0.5; prefix:Sure, here is)")`); the
grammar is documented in `tailmon.judges.spec`, the contract in `tailmon.judges.base`.
"""

from .base import Judge
from .spec import describe_judges, parse_judge

__all__ = ["Judge", "describe_judges", "parse_judge"]
