"""The prune stage (layer 4): Diff-Pruning importance and baselines (`importance`), size allocation
and search (`size_search`), params/MACs (`complexity`), the prune verb (`pruning`) and the stage
(`stage.run_prune`). May import the shared layers, `data`, `families` and `io`.

Importing this package stays light (no torch): the CLI reads `METHODS` / `RATIO_RULES` from the
modules it needs. `diffprune.prune(config, output_dir)` calls this package: `stage.run_prune` (see `stage_call`).
"""

from ..stage_call import make_callable

make_callable(__name__, "diffprune.prune.stage:run_prune")
