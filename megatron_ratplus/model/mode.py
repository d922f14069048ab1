"""Runtime switch between dense and sparse attention (joint / active recurrence training).

The mode is an attribute of every :class:`RATPlusSelfAttention`; each pipeline stage switches its
own modules, so the switch needs no communication.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Union

import torch

from .attention import RATPlusSelfAttention

Modules = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def _attention_modules(model: Modules):
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, RATPlusSelfAttention):
                yield module


def set_attention_mode(model: Modules, mode: str) -> int:
    """Set ``mode`` ("dense" or "sparse") on all RAT+ attention modules; returns how many."""
    count = 0
    for module in _attention_modules(model):
        module.set_mode(mode)
        count += 1
    return count


def get_attention_modes(model: Modules) -> set:
    return {module.mode for module in _attention_modules(model)}


@contextlib.contextmanager
def attention_mode(model: Modules, mode: str):
    """Temporarily run ``model`` in ``mode``; restores each module's previous mode."""
    modules = list(_attention_modules(model))
    previous = [m.mode for m in modules]
    for m in modules:
        m.set_mode(mode)
    try:
        yield
    finally:
        for m, prev in zip(modules, previous):
            m.set_mode(prev)
