"""Config keys a model class does not take: dropped before diffprune builds a model, quiet while diffusers loads.

A config written by an older diffusers (e.g. facebook/DiT-XL-2-256's `transformer/config.json`, from
the days of `Transformer2DModel`) holds keys today's class ignores (`use_linear_projection`,
`only_cross_attention`, ...). diffusers warns "The config attributes {...} were passed to <class>, but
are not expected and will be ignored" on every build, and keeps them in the built model's config, so
each later build from that config warned again (15 times in one prune -> sample -> evaluate run). The
keys change nothing: `accepted_config` drops them before diffprune builds a model (so pruned folders
are written without them), and `quiet_ignored_config_keys` turns diffusers' warning into a debug line
while diffprune loads a folder that still holds them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_DIFFUSERS_CONFIG_LOGGER = "diffusers.configuration_utils"  # configuration_utils.extract_init_dict warns there
_IGNORED = "but are not expected and will be ignored"


def accepted_config(cls: type, config: dict) -> dict:
    """`config` without the keys `cls.__init__` does not take (private `_keys` stay, as diffusers keeps them)."""
    init_keys = getattr(cls, "_get_init_keys", None)
    if init_keys is None:  # not a diffusers ConfigMixin (e.g. a transformers model): nothing to drop
        return dict(config)
    keys = set(init_keys(cls)) - {"self", "kwargs"} - set(getattr(cls, "ignore_for_config", ()) or ())
    keys |= set(getattr(cls, "_deprecated_kwargs", ()) or ())
    return {k: v for k, v in config.items() if k.startswith("_") or k in keys}


class _IgnoredKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _IGNORED in message:
            logger.debug("diffusers: %s", message)
            return False
        return True


@contextlib.contextmanager
def quiet_ignored_config_keys() -> Iterator[None]:
    """While diffprune loads: diffusers' "config attributes ... will be ignored" warning goes to debug."""
    target = logging.getLogger(_DIFFUSERS_CONFIG_LOGGER)
    quiet = _IgnoredKeys()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)
