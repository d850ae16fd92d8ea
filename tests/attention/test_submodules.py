"""The one module walker and the one replacer: qualified names, shared modules, refusals."""

from __future__ import annotations

import pytest
from torch import nn

from asap.attention.operators import SinkhornOperator, SoftmaxOperator
from asap.attention.submodules import find_modules, get_module, replace_module


class Block(nn.Module):
    def __init__(self, operator: nn.Module):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.operator = operator


def _model(shared: nn.Module | None = None) -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(shared or SinkhornOperator()), Block(shared or SinkhornOperator())])
    model.head = nn.Linear(4, 2)
    return model


def test_find_by_class_and_predicate_in_registration_order():
    model = _model()
    found = find_modules(model, SinkhornOperator)
    assert [f.name for f in found] == ["blocks.0.operator", "blocks.1.operator"]
    assert all(f.aliases == (f.name,) for f in found)
    by_name = find_modules(model, lambda name, module: name.startswith("blocks.1"))
    assert [f.name for f in by_name] == ["blocks.1", "blocks.1.proj", "blocks.1.operator"]
    assert [f.name for f in find_modules(model, (nn.Linear, SoftmaxOperator))] == [
        "blocks.0.proj", "blocks.1.proj", "head"
    ]
    with pytest.raises(TypeError, match="match must be"):
        find_modules(model, "Linear")


def test_shared_module_is_found_once_with_every_name():
    shared = SinkhornOperator()
    model = _model(shared)
    (found,) = find_modules(model, SinkhornOperator)
    assert found.module is shared and found.aliases == ("blocks.0.operator", "blocks.1.operator")


def test_get_and_replace_by_qualified_name():
    model = _model()
    assert get_module(model, "") is model and isinstance(get_module(model, "blocks.1.proj"), nn.Linear)
    new = SoftmaxOperator()
    old = replace_module(model, "blocks.1.operator", new)
    assert isinstance(old, SinkhornOperator) and model.blocks[1].operator is new
    assert "blocks.1.operator" in dict(model.named_modules())
    with pytest.raises(LookupError, match=r"no submodule 'blocks\.2\.operator' \(no '2' under blocks\)"):
        get_module(model, "blocks.2.operator")
    with pytest.raises(LookupError, match="no submodule 'blocks.0.missing' to replace"):
        replace_module(model, "blocks.0.missing", new)
    assert replace_module(model, "blocks.0.extra", new, create=True) is None and model.blocks[0].extra is new
    model.blocks[0].register_buffer("scale_buffer", None)
    model.blocks[0].not_a_module = 3
    with pytest.raises(LookupError):  # an attribute that is not a module is never overwritten
        replace_module(model, "blocks.0.not_a_module", new, create=True)
    with pytest.raises(ValueError, match="root"):
        replace_module(model, "", new)
    with pytest.raises(TypeError, match="only be given a module"):
        replace_module(model, "head", "linear")
