"""The evaluate stage (layer 7): `stage` (EvaluateConfig, `evaluate`, the table), `cost` (params,
MACs, latency), `reference` (the FID/KID reference: digits, images or statistics), `outputs` (where
the result goes). Measurements themselves live in `metrics/`
(same layer). May import every earlier layer: shared, data, families, io, prune, train, sample.
"""

from ..stage_call import make_callable
from .stage import EvaluateConfig, evaluate, format_table

__all__ = ["EvaluateConfig", "evaluate", "format_table"]

make_callable(__name__, "diffprune.evaluate.stage:evaluate")
