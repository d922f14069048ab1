"""Filters for Megatron-core's import-time notices about optional dependencies.

Megatron-core 0.16 warns, in every process that imports it, that Transformer-Engine or apex is
not installed and that it falls back to its PyTorch implementations. In this project Transformer-Engine and apex are optional by design (used when
present, as in NGC containers), so on a machine without them these messages are noise that
buries the first lines a user reads. Only these messages, raised from ``megatron.core``, are
filtered; every other warning is shown as usual.
"""
from __future__ import annotations

import os
import re
import warnings

# Prefixes of the messages (as raised by megatron-core 0.16.1).
MESSAGES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Transformer Engine is not installed",
)


def hide_optional_dependency_warnings() -> None:
    """Ignore :data:`MESSAGES` when ``megatron.core`` raises them, in this process."""
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning,
                                module=r"megatron\.core")


def hide_in_child_processes() -> None:
    """The same for the Python processes this one starts (async checkpoint writers, data-loader
    workers started by spawn), through ``PYTHONWARNINGS``, after any filters already there.
    (Its entries match by message prefix; they cannot name the module.) For the command-line
    tools: a library should not change its host's environment."""
    ours = [f"ignore:{message}:UserWarning" for message in MESSAGES]
    present = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    os.environ["PYTHONWARNINGS"] = ",".join(present + [e for e in ours if e not in present])
