"""RAT+ as Megatron-core modules: attention, layer specs, configs, presets and the model builder."""
from .attention import RATPlusSelfAttention
from .builder import build_gpt_model, count_parameters
from .config import RATPlusModelArgs, RATPlusTransformerConfig, pad_vocab_size, to_transformer_config
from .mode import attention_mode, get_attention_modes, set_attention_mode
from .presets import PRESETS, get_preset, preset_names
from .specs import get_ratplus_block_spec, get_ratplus_layer_local_spec, get_ratplus_layer_te_spec

__all__ = [
    "RATPlusSelfAttention", "build_gpt_model", "count_parameters", "RATPlusModelArgs",
    "RATPlusTransformerConfig", "pad_vocab_size", "to_transformer_config", "attention_mode",
    "get_attention_modes", "set_attention_mode", "PRESETS", "get_preset", "preset_names",
    "get_ratplus_block_spec", "get_ratplus_layer_local_spec", "get_ratplus_layer_te_spec",
]
