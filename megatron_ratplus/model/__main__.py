"""``python -m megatron_ratplus.model [PRESET ...]``: build presets on the meta device (no memory,
no GPU) through Megatron's GPTModel and print their parameter counts next to the formula's."""
import sys
import warnings


def main(names):
    warnings.filterwarnings("ignore")
    import torch

    from ..parallel import ParallelLayout, destroy_distributed, initialize_distributed
    from . import build_gpt_model, count_parameters, get_preset, pad_vocab_size, preset_names, to_transformer_config

    initialize_distributed(ParallelLayout())
    print(f"{'preset':<18}{'layers':>7}{'d':>6}{'heads':>7}{'built params':>16}{'formula':>16}")
    for name in names or preset_names():
        args = get_preset(name)
        cfg = to_transformer_config(args, use_cpu_initialization=True, perform_initialization=False)
        with torch.device("meta"):
            model = build_gpt_model(args, cfg, spec="local")
        built, formula = count_parameters(model), args.num_parameters(pad_vocab_size(args.vocab_size))
        print(f"{name:<18}{args.num_layers:>7}{args.hidden_size:>6}{args.num_attention_heads:>7}"
              f"{built:>16,}{formula:>16,}")
        if built != formula:
            raise SystemExit(f"{name}: built model has {built} parameters, formula says {formula}")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
