"""The one way speed-ups change a model: an instance ``forward`` on the modules that qualify,
marked with a flag, and removed again by the same flag.

A switched module keeps its class, parameters and state-dict names; only the function its
``forward`` runs differs, and every speed-up that uses this checks first (a numerical probe) that
the new function computes what the module's own does. :func:`restore_forwards` gives back the
class's ``forward``, so a model handed to the Trainer comes back as it was.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection
from typing import Any

from torch import nn

__all__ = ["flagged", "restore_forwards", "switch_forwards"]


def switch_forwards(model: nn.Module, flag: str, forward: Callable[..., Any],
                     qualifies: Callable[[nn.Module], bool]) -> int:
    """Give every module that ``qualifies`` the instance ``forward``, marked with ``flag``; returns
    how many modules run it (those switched before included)."""
    count = 0
    for module in model.modules():
        if getattr(module, flag, False):
            count += 1
        elif qualifies(module):
            module.forward = types.MethodType(forward, module)
            setattr(module, flag, True)
            count += 1
    return count


def flagged(model: nn.Module, flag: str) -> set[int]:
    """Ids of ``model``'s modules switched under ``flag``."""
    return {id(m) for m in model.modules() if getattr(m, flag, False)}


def restore_forwards(model: nn.Module, flag: str, keep: Collection[int] = ()) -> int:
    """Undo :func:`switch_forwards` for ``flag``: the modules' class forward again, except for the
    modules whose ids are in ``keep`` (switched before, by someone else); returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, flag, False) and id(module) not in keep:
            vars(module).pop("forward", None)
            delattr(module, flag)
            count += 1
    return count
