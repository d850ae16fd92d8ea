"""Finding and replacing submodules of any ``nn.Module`` by qualified name: the one walker and the one replacer.

Every place that looks for attention operators inside a model (the compile
stage's Sinkhorn layers, the artifacts' ASAP layers, the Hugging Face
integration's attention modules) walks the model with :func:`find_modules`,
and every place that puts one operator in place of another calls
:func:`replace_module`. Names are PyTorch's qualified names, as
``model.named_modules()`` gives them (``"encoder.layers.0.attn.operator"``;
``"0"`` for the first entry of an ``nn.ModuleList``)::

    from asap.attention import SinkhornOperator
    from asap.attention.submodules import find_modules, replace_module

    for found in find_modules(model, SinkhornOperator):
        print(found.name, found.aliases, found.module)
    old = replace_module(model, "encoder.layers.0.attn.operator", new_operator)

A module registered under several names (one operator object shared by two
layers) is found once, with every name in ``aliases``; replacing it at every
one of its names keeps the sharing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Match = type | tuple[type, ...] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class FoundModule:
    """A submodule found by :func:`find_modules`.

    ``name`` is its first qualified name in registration order (``""`` for the
    root itself); ``aliases`` every qualified name it is registered under,
    ``name`` first (more than one when the same object is shared).
    """

    name: str
    module: nn.Module
    aliases: tuple[str, ...]


def find_modules(root: nn.Module, match: Match) -> list[FoundModule]:
    """Every submodule of ``root`` (``root`` included) that ``match`` accepts, each object once, in registration order.

    ``match`` is a class or a tuple of classes (``isinstance``), or a predicate
    ``(qualified_name, module) -> bool`` (called once per name a module has).
    """
    if isinstance(match, type) or (isinstance(match, tuple) and all(isinstance(t, type) for t in match)):
        kinds = match
        accept: Callable[[str, nn.Module], bool] = lambda name, module: isinstance(module, kinds)  # noqa: E731
    elif callable(match):
        accept = match
    else:
        raise TypeError(f"find_modules: match must be a class, a tuple of classes or a predicate, got {match!r:.80}")
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if accept(name, module):
            key = id(module)
            modules.setdefault(key, module)
            if name not in names.setdefault(key, []):
                names[key].append(name)
    return [FoundModule(names[key][0], modules[key], tuple(names[key])) for key in modules]


def get_module(root: nn.Module, name: str) -> nn.Module:
    """The submodule of ``root`` at the qualified ``name`` (``""`` is ``root``).

    Raises:
        LookupError: one line naming the first part of ``name`` that is not a submodule.
    """
    if not isinstance(name, str):
        raise LookupError(f"a module name is a string, got {name!r:.80}")
    module = root
    if name == "":
        return module
    done: list[str] = []
    for part in name.split("."):
        child = module._modules.get(part) if part else None
        if child is None:
            where = ".".join(done) or f"the {type(root).__name__}"
            raise LookupError(f"{type(root).__name__} has no submodule {name!r} (no {part!r} under {where})")
        module = child
        done.append(part)
    return module


def replace_module(root: nn.Module, name: str, new: nn.Module, *, create: bool = False) -> nn.Module | None:
    """Put ``new`` at the qualified ``name`` of ``root``, in place; return the module that was there.

    The parent (``name`` without its last part) must exist. The last part must
    name a submodule already, unless ``create=True`` (then it is added when
    absent and ``None`` is returned). An attribute that holds something else
    than a module (a tensor, a method) is never overwritten.

    Raises:
        LookupError: no such parent or submodule; ValueError: ``name`` is the root.
    """
    if not isinstance(new, nn.Module):
        raise TypeError(f"replace_module: {name!r} can only be given a module, got {type(new).__name__}")
    if name == "":
        raise ValueError("replace_module: the root module itself cannot be replaced in place")
    parent_name, _, attr = name.rpartition(".")
    parent = get_module(root, parent_name)
    old = parent._modules.get(attr)
    if old is None:
        if not create or (hasattr(parent, attr) and attr not in parent._modules):
            raise LookupError(f"{type(root).__name__} has no submodule {name!r} to replace")
    setattr(parent, attr, new)
    return old


__all__ = ["FoundModule", "find_modules", "get_module", "replace_module"]
