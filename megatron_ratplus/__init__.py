"""megatron-ratplus: RAT+ language models on Megatron-core (layers, kernels, training, data,
checkpoints, Hugging Face export). Importing the package hides Megatron-core's notices that the
optional Transformer-Engine / apex are missing (:mod:`megatron_ratplus.warning_filters`)."""
from .warning_filters import hide_optional_dependency_warnings as _hide

_hide()
