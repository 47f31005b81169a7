"""Build a component (autoencoder, text encoder, DiT) from its config node's `_target_`.

Every component config names its class with Hydra's `_target_` and holds the constructor's
arguments, the layout `hydra.utils.instantiate` reads. Two guards sit in front, because these
nodes are also read back from the hyper-parameters stored in checkpoints:

- the target must be a subclass of the component's base class, so a checkpoint (loaded with
  `weights_only=True`, no pickled code) cannot make loading call an arbitrary function;
- checkpoints written before `_target_` existed name their class with a short `name`
  (`name: pca`); `legacy` maps those names to targets, so they keep loading.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping


def component_target(
    cfg: Mapping, group: str, legacy: Mapping[str, str] | None = None, default: str | None = None
) -> str:
    """The `_target_` of a config node, from a legacy `name` or `default` when it has none."""
    target = cfg.get("_target_")
    if target:
        return str(target)
    name = cfg.get("name")
    if name is not None:
        legacy = legacy or {}
        if name not in legacy:
            raise ValueError(
                f"{group}.name={name!r} is unknown: choose one of {sorted(legacy)}, or name the "
                f"class with {group}._target_"
            )
        return legacy[name]
    if default is None:
        raise ValueError(f"the {group} config names no class; fix: set {group}._target_")
    return default


def component_class(
    cfg: Mapping,
    base: type,
    group: str,
    legacy: Mapping[str, str] | None = None,
    default: str | None = None,
) -> type:
    """The class a config node names, checked to be a subclass of `base`."""
    target = component_target(cfg, group, legacy, default)
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{group}._target_={target!r} cannot be imported ({type(err).__name__}); fix: a "
            f"dotted path to a {base.__name__} subclass, e.g. {base.__module__}.{base.__name__}"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(
            f"{group}._target_={target!r} is not a {base.__name__} subclass; fix: name one, "
            f"e.g. {base.__module__}.{base.__name__}"
        )
    return cls


def build_component(
    cfg: Mapping,
    base: type,
    group: str,
    legacy: Mapping[str, str] | None = None,
    default: str | None = None,
):
    """Build the node's class (checked, see `component_class`) with its other keys as keyword
    arguments, as `hydra.utils.instantiate` would; a legacy `name` key is dropped. Called
    directly rather than through instantiate so a constructor's own one-line ValueError
    reaches the user unwrapped."""
    cls = component_class(cfg, base, group, legacy, default)
    kwargs = {k: v for k, v in cfg.items() if k not in ("_target_", "name")}
    try:
        return cls(**kwargs)
    except TypeError as err:  # an unknown or missing argument: say which component
        raise TypeError(f"{group} {cls.__name__}: {err}") from err
