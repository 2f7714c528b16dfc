"""The sample stage (layer 6): timestep schedules (`schedules`), the sampling loop and the stage
(`loop`), sample folder files (`files`). May import every earlier layer: shared, data, families,
io, prune, train.

Public: `sample_to_folder` (the stage, `diffprune.sample(...)`) and `sample` (images in memory).
"""

from ..stage_call import make_callable
from .loop import sample, sample_to_folder

__all__ = ["sample", "sample_to_folder"]

make_callable(__name__, "diffprune.sample.loop:sample_to_folder")
