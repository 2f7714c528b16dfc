"""The prune stage (layer 4): Diff-Pruning importance and baselines (`importance`; the threshold rule in
`threshold_rule`, how a sweep runs in `sweep_runtime`), depth pruning (`depth`, `depth_scores`,
`depth_stage`), what `prune` prints (`dry_run`), the config (`config`),
per-layer ratio rules (`ratio_rules`), how widths are spread under one budget (`allocation`: uniform,
global, isomorphic), the ratio search (`bisection`) and size planning (`size_search`, `width_macs`),
params/MACs (`complexity`), width pruning in memory (`pruning.prune_model`) and the stage
(`stage.run_prune`). May import the shared layers, `data`, `families` and `io`. Imports point one way
(docs/ARCHITECTURE.md): pruning -> size_search -> allocation / bisection / ratio_rules -> config ->
importance -> threshold_rule / sweep_runtime; dry_run -> stage -> depth_stage -> depth_scores -> depth.

Importing this package stays light (no torch): the CLI reads `METHODS` / `RATIO_RULES` / `ALLOCATIONS`
from the modules it needs. `diffprune.prune(config, output_dir)` calls this package: `stage.run_prune`
(see `stage_call`).
"""

from ..stage_call import make_callable

make_callable(__name__, "diffprune.prune.stage:run_prune")
