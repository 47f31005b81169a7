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
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ComponentGroup:
    """One kind of component: its base class, its config group (for messages), the legacy
    short names of old checkpoints and the class a node without `_target_` means, if any."""

    base: type
    group: str
    legacy: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def target(self, cfg: Mapping) -> str:
        """The `_target_` of a config node, from a legacy `name` or the default without one."""
        target = cfg.get("_target_")
        if target:
            return str(target)
        name = cfg.get("name")
        if name is not None:
            if name not in self.legacy:
                raise ValueError(
                    f"{self.group}.name={name!r} is unknown: choose one of {sorted(self.legacy)}, "
                    f"or name the class with {self.group}._target_"
                )
            return self.legacy[name]
        if self.default is None:
            raise ValueError(
                f"the {self.group} config names no class; fix: set {self.group}._target_"
            )
        return self.default

    def cls(self, cfg: Mapping) -> type:
        """The class a config node names, checked to be a subclass of `base`."""
        target, base = self.target(cfg), self.base
        module, _, attr = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(
                f"{self.group}._target_={target!r} cannot be imported ({type(err).__name__}); "
                f"fix: a dotted path to a {base.__name__} subclass, e.g. "
                f"{base.__module__}.{base.__name__}"
            ) from err
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(
                f"{self.group}._target_={target!r} is not a {base.__name__} subclass; fix: name "
                f"one, e.g. {base.__module__}.{base.__name__}"
            )
        return cls

    def build(self, cfg: Mapping):
        """Build the node's class (checked, see `cls`) with its other keys as keyword arguments,
        as `hydra.utils.instantiate` would; a legacy `name` key is dropped. Called directly
        rather than through instantiate so a constructor's own one-line ValueError reaches the
        user unwrapped."""
        cls = self.cls(cfg)
        kwargs = {k: v for k, v in cfg.items() if k not in ("_target_", "name")}
        try:
            return cls(**kwargs)
        except TypeError as err:  # an unknown or missing argument: say which component
            raise TypeError(f"{self.group} {cls.__name__}: {err}") from err
