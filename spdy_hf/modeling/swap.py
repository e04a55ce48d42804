"""Changes to a model's module tree that can be undone and redone: timing a shrunk or deployed form of the live model
without a copy of it.

`TreeSwap.record(model, change)` runs `change(model)` (shrinking groups, swapping in sparse kernels: anything that
replaces submodules, parameters or buffers, sets plain attributes such as head counts, or gives a module a config
of its own) and records what it replaced. `revert()` puts the originals back, `apply()` the changed ones again; both
are a handful of `setattr`s, so the two forms can be timed interleaved. Tensors changed in place are not recorded: a
change must build new modules (as `spdy_hf.modeling.groups.shrink` and `spdy_hf.deploy.shrink` do).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MISSING = object()
_PLAIN = (int, float, bool, str, type(None))
_OBJECTS = ("config",)  # attributes holding objects that a change may replace (a shrunk attention's own config)


def _state(module: nn.Module) -> dict:
    state = {("_modules", k): v for k, v in module._modules.items()}
    state.update({("_parameters", k): v for k, v in module._parameters.items()})
    state.update({("_buffers", k): v for k, v in module._buffers.items()})
    state.update({("", k): v for k, v in vars(module).items()
                  if not k.startswith("_") and (isinstance(v, _PLAIN) or k in _OBJECTS)})
    return state


def _set(module: nn.Module, key: tuple[str, str], value) -> None:
    where, name = key
    target = getattr(module, where) if where else vars(module)
    if value is _MISSING:
        target.pop(name, None)
    else:
        target[name] = value


class TreeSwap:
    """What one change replaced: per module, (key, before, after)."""

    def __init__(self, changes: list[tuple[nn.Module, tuple[str, str], object, object]]):
        self.changes = changes

    @classmethod
    def record(cls, model: nn.Module, change: Callable[[nn.Module], object]) -> TreeSwap:
        """Runs `change(model)` and records it; the model is left changed."""
        before = {id(m): (m, _state(m)) for m in model.modules()}
        change(model)
        changes = []
        for module, old in before.values():
            new = _state(module)
            for key in old.keys() | new.keys():
                a, b = old.get(key, _MISSING), new.get(key, _MISSING)
                if a is not b and not (isinstance(a, _PLAIN) and a == b and type(a) is type(b)):
                    changes.append((module, key, a, b))
        return cls(changes)

    def apply(self) -> None:
        for module, key, _, after in self.changes:
            _set(module, key, after)

    def revert(self) -> None:
        for module, key, before, _ in reversed(self.changes):
            _set(module, key, before)

    def wrap(self, fn: Callable[[], object]) -> Callable[[], object]:
        """`fn` run with this form in the model, which is put back as it was after each call."""
        def call():
            self.apply()
            try:
                return fn()
            finally:
                self.revert()
        return call
