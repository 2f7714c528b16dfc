"""`diffprune.prune(...)`, `train`, `sample`, `evaluate`, `report`: stage packages you can call.

The public API's verbs share their names with the stage packages (`prune/`, `train/`, `sample/`,
`evaluate/`, `report/`), and Python makes an imported subpackage an attribute of `diffprune`.
So `diffprune.<stage>` is always the package (the facade's `__getattr__` imports it on first use),
and each of these packages is callable: calling it runs its stage function, e.g.
`diffprune.prune(config, output_dir)` runs `diffprune.prune.stage.run_prune`. Shared layer: the
standard library only.
"""

from __future__ import annotations

import importlib
import sys
import types


class CallableStage(types.ModuleType):
    """A stage package that, called, runs its stage function (`_stage_function`, "module:name")."""

    def __call__(self, *args, **kwargs):
        module, _, name = self._stage_function.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def make_callable(package: str, function: str) -> None:
    """Make the stage package `package` callable as `function` ("diffprune.prune.stage:run_prune")."""
    module = sys.modules[package]
    module.__class__ = CallableStage
    module._stage_function = function
