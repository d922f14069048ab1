"""Hugging Face side of megatron-ratplus: the transformers RAT+ model, conversions and export.

* ``configuration_ratplus`` / ``modeling_ratplus``: ``RATPlusConfig``, ``RATPlusModel``,
  ``RATPlusForCausalLM`` and the compact generation cache ``RATPlusCache``. These two files are
  self-contained (torch + transformers) and are copied next to exported weights.
* ``conversion``: Megatron <-> HF state dicts, configs, and the Llama importer.
* ``export``: ``write_hf_folder`` / ``read_hf_folder``.
"""
from .configuration_ratplus import RATPlusConfig
from .conversion import (hf_config_from_model_args, hf_to_megatron_state_dict, llama_to_ratplus,
                         megatron_to_hf_state_dict, model_args_dict_from_hf_config)
from .export import read_hf_folder, write_hf_folder
from .modeling_ratplus import RATPlusCache, RATPlusForCausalLM, RATPlusModel, compact_cache_entries


def _register_auto_classes() -> None:
    """In a process that imported this package the Auto classes know ``model_type: ratplus``,
    so a folder also loads without ``trust_remote_code`` (with this package's classes)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(RATPlusConfig.model_type, RATPlusConfig, exist_ok=True)
    AutoModel.register(RATPlusConfig, RATPlusModel, exist_ok=True)
    AutoModelForCausalLM.register(RATPlusConfig, RATPlusForCausalLM, exist_ok=True)


_register_auto_classes()

__all__ = [
    "RATPlusConfig", "RATPlusModel", "RATPlusForCausalLM", "RATPlusCache", "compact_cache_entries",
    "megatron_to_hf_state_dict", "hf_to_megatron_state_dict", "hf_config_from_model_args",
    "model_args_dict_from_hf_config", "llama_to_ratplus", "write_hf_folder", "read_hf_folder",
]
