"""Pins on :mod:`zoo.introspect`'s reading of constructor annotations: a parameter annotated with the bare
``collections.abc.Callable`` (what ``from collections.abc import Callable`` gives a plugin author) is a
factory, so a recipe may name a registered component there, as it may for ``typing.Callable`` or ``type``.

Found by mutation testing: the shipped components annotate with ``typing``'s forms only, so dropping the
``a is collections.abc.Callable`` test (``get_origin`` of the bare ABC is None) changed nothing tested."""

from __future__ import annotations

import collections.abc
import typing

import pytest
import torch

import zoo
from zoo import registry
from zoo.introspect import is_factory_type

pytestmark = pytest.mark.usefixtures("one_thread")


class BareCallableNet(torch.nn.Module):
    """A plugin backbone whose factory parameter is annotated with the bare collections.abc.Callable."""

    def __init__(self, maker: collections.abc.Callable = torch.nn.Identity, hidden_size: int = 8):
        super().__init__()
        self.made = maker(hidden_size)


@pytest.fixture
def bare_callable_net():
    zoo.register("backbone", "pins11c_bare_callable")(BareCallableNet)
    yield
    registry.unregister("backbone", "pins11c_bare_callable")


def test_every_spelling_of_a_callable_or_class_is_a_factory_type():
    """Bare, subscripted and optional forms of Callable and type are factories; plain data types are not."""
    for ann in (collections.abc.Callable, typing.Optional[collections.abc.Callable], collections.abc.Callable[..., int],
                typing.Callable, typing.Callable[[int], torch.nn.Module], type, type[torch.nn.Module]):
        assert is_factory_type(ann), ann
    for ann in (int, str, list[int], typing.Optional[float], dict):
        assert not is_factory_type(ann), ann


def test_a_component_named_for_a_bare_callable_parameter_is_built(bare_callable_net):
    """``maker: layernorm`` for ``maker: collections.abc.Callable``: without the bare-ABC case the name is
    checked as plain data and refused ('expected Callable, got str')."""
    model = zoo.build_model({"model": {"type": "pins11c_bare_callable", "maker": "layernorm"}})
    assert isinstance(model.made, torch.nn.LayerNorm) and model.made.normalized_shape == (8,)
