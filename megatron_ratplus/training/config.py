"""Training configuration: YAML recipes plus dotted command-line overrides.

A recipe has six sections — ``model``, ``parallel``, ``train``, ``data``, ``checkpoint``,
``logging`` — each a dataclass below. ``model`` names a preset and may override any
:class:`~megatron_ratplus.model.config.RATPlusModelArgs` field. Overrides look like
``train.lr=8e-5 model.dilation=[16,16,64]`` (values parsed as YAML). Unknown sections or keys are
errors that list the valid ones: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..checkpoint.state import DISTRIBUTED_OPTIMIZER_FORMATS
from ..model.config import RATPlusModelArgs
from ..model.presets import get_preset


SCHEDULE_ON_RESUME = ("strict", "checkpoint", "config")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the offending key."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    spec: str = "auto"                     # auto | local | te
    kernel_backend: str = "auto"           # auto | fused | reference
    overrides: Dict[str, Any] = field(default_factory=dict)   # any RATPlusModelArgs field

    def model_args(self, vocab_size: Optional[int] = None, seq_len: Optional[int] = None) -> RATPlusModelArgs:
        values = dict(self.overrides)
        if vocab_size is not None and "vocab_size" not in values:
            values["vocab_size"] = vocab_size
        if seq_len is not None:
            values["max_seq_len"] = max(seq_len, values.get("max_seq_len", 0))
        try:
            return get_preset(self.preset, **values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True     # shards optimizer state over DP (GPU); plain on CPU
    overlap_grad_reduce: bool = True       # GPU only
    overlap_param_gather: bool = False
    # Initialise full weights on CPU and shard them (Megatron's use_cpu_initialization): the same
    # model for every TP size from one seed (each pipeline stage has its own seed), at the cost of a
    # slower start. Always on in CPU mode.
    cpu_initialization: bool = False


@dataclass
class TrainSection:
    seq_len: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 512
    max_steps: Optional[int] = None        # stop after this many global batches …
    max_tokens: Optional[int] = None       # … or this many tokens (whichever is given/first)
    lr: float = 8e-4
    min_lr: float = 1e-6
    warmup_fraction: float = 0.05
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "bf16"                # bf16 | fp32
    seed: int = 1234
    joint: bool = True                     # active recurrence learning: sparse step + dense step
    mode: str = "dense"                    # attention mode when joint is off (adaptation: sparse)
    max_nonfinite_steps: int = 5           # halt after this many consecutive non-finite losses or grad norms
    recompute: Optional[str] = None        # None | "full" | "selective"
    # Weight-gradient GEMMs accumulate into the fp32 gradient buffer (Megatron's
    # gradient_accumulation_fusion; apex's extension or torch's fp32-output GEMM). None: on where
    # supported on GPU, off in CPU mode.
    gradient_accumulation_fusion: Optional[bool] = None
    # AdamW and the copy of the fp32 master weights into the bf16 model weights in one Triton pass
    # (training/fused_optimizer_update.py), where Megatron has no TE precision-aware optimizer.
    # None: on where it applies on GPU, off in CPU mode; true: required (an error if it cannot apply).
    fused_optimizer_update: Optional[bool] = None
    # Replay each mode's forward/backward from a CUDA graph (training/cuda_graph.py) after
    # cuda_graph_warmup_steps eager steps per mode: removes the host's launch time from the step.
    # GPU only, pipeline_parallel=1, no recompute, no overlap_param_gather.
    cuda_graph: bool = False
    cuda_graph_warmup_steps: int = 2


@dataclass
class DataSection:
    streams: List[Dict[str, Any]] = field(default_factory=list)   # [{local, remote, proportion}]
    default_corpus: bool = True            # no streams given: prepare the embedded default corpus
    default_dir: str = "data_cache/default"
    default_size_mb: float = 3.0
    default_vocab_size: int = 4096
    default_seed: int = 1234             # corpus sampling (independent of train.seed)
    cache_dir: Optional[str] = None
    num_workers: int = 0
    # Data readers that share a host (and so streaming's shared memory and a local cache). Default:
    # LOCAL_WORLD_SIZE // (TP×PP). Set it when several launcher "nodes" run on one host.
    readers_per_node: Optional[int] = None
    # Hash every local shard file of both splits once at start-up, on every reader (a full read of the
    # dataset per reader and restart). Off by default: streaming already checks shards it downloads or
    # decompresses; raw shards read in place are checked by `ratplus-data validate DIR` after a copy.
    verify_shards: bool = False
    val_streams: List[Dict[str, Any]] = field(default_factory=list)  # default: the "val" split


@dataclass
class CheckpointSection:
    save_dir: Optional[str] = None
    save_interval: Optional[int] = None    # steps; a final save always happens when save_dir is set
    keep_last: Optional[int] = None
    load: Optional[str] = None             # "latest", an iter_* directory, or None
    # weights only (adaptation / evaluation), fresh optimizer; with load=latest it applies only
    # when save_dir holds no checkpoint yet (so a preempted adaptation run resumes itself)
    init_from: Optional[str] = None
    async_save: bool = False               # GPU only
    exit_duration_minutes: Optional[float] = None
    # A resumed run whose LR/WD schedule (lr, min_lr, warmup, decay steps and style, weight decay)
    # differs from the checkpoint's: "strict" refuses with the differences listed (Megatron-LM's
    # default), "checkpoint" keeps the checkpoint's schedule, "config" continues on the config's
    # schedule from the resumed step (e.g. more steps: train.max_steps raised).
    lr_schedule_on_resume: str = "strict"
    # The distributed optimizer's state (GPU): "dp_reshardable" (Megatron-LM's default: every rank
    # writes its own shard; resumes under another DP size, not another TP/PP/VPP layout) or
    # "fully_reshardable" (gathered over DP into host memory at each save; resumes under any layout).
    optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMATS[0]


@dataclass
class LoggingSection:
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: int = 2                    # global batches per evaluation (Megatron-LM's meaning)
    tensorboard_dir: Optional[str] = None
    progress: bool = True                  # live progress display on rank 0
    wandb_project: Optional[str] = None    # off by default
    metrics_jsonl: Optional[str] = None    # machine-readable per-step metrics (rank 0)
    peak_tflops: Optional[float] = None    # for MFU; default: the GPU's datasheet bf16 peak


SECTIONS = {
    "model": ModelSection, "parallel": ParallelSection, "train": TrainSection,
    "data": DataSection, "checkpoint": CheckpointSection, "logging": LoggingSection,
}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        model = d.pop("model")
        d["model"] = {"preset": model["preset"], "spec": model["spec"],
                      "kernel_backend": model["kernel_backend"], **model["overrides"]}
        return d

    def validate(self) -> None:
        t = self.train
        for name in ("seq_len", "micro_batch_size", "global_batch_size"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(t, name)!r}")
        if t.max_steps is None and t.max_tokens is None:
            raise ConfigError("give train.max_steps or train.max_tokens (when to stop)")
        if t.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision must be bf16 or fp32, got {t.precision!r}")
        if t.mode not in ("dense", "sparse"):
            raise ConfigError(f"train.mode must be dense or sparse, got {t.mode!r}")
        if not 0.0 <= t.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
        if not t.clip_grad >= 0.0:    # Megatron would silently skip clipping for a negative or NaN value
            raise ConfigError(f"train.clip_grad must be >= 0 (0: no clipping), got {t.clip_grad}")
        if t.fused_optimizer_update not in (None, True, False):
            raise ConfigError("train.fused_optimizer_update must be true, false or null (automatic), "
                              f"got {t.fused_optimizer_update!r}")
        if t.gradient_accumulation_fusion not in (None, True, False):
            raise ConfigError("train.gradient_accumulation_fusion must be true, false or null (automatic), "
                              f"got {t.gradient_accumulation_fusion!r}")
        if t.cuda_graph not in (True, False):
            raise ConfigError(f"train.cuda_graph must be true or false, got {t.cuda_graph!r}")
        if not isinstance(t.cuda_graph_warmup_steps, int) or t.cuda_graph_warmup_steps < 1:
            raise ConfigError("train.cuda_graph_warmup_steps must be an integer >= 1 (autotuning and compilation "
                              f"must happen before the capture), got {t.cuda_graph_warmup_steps!r}")
        if t.cuda_graph and self.parallel.pipeline_parallel != 1:
            raise ConfigError("train.cuda_graph=true needs parallel.pipeline_parallel=1 (the pipeline "
                              "schedules' point-to-point exchange is not captured)")
        if t.cuda_graph and self.parallel.overlap_param_gather:
            raise ConfigError("train.cuda_graph=true cannot be combined with parallel.overlap_param_gather=true (its "
                              "forward hooks wait for the optimizer's all-gather on the host side, which a replay skips)")
        if t.cuda_graph and t.recompute:
            raise ConfigError(f"train.cuda_graph=true cannot be combined with train.recompute={t.recompute!r} "
                              "(recomputation's RNG state handling runs on the host)")
        if t.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.lr_decay_style must be cosine|linear|constant, got {t.lr_decay_style!r}")
        self._validate_values()
        p = self.parallel
        for name in ("tensor_parallel", "pipeline_parallel"):
            if not isinstance(getattr(p, name), int) or getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be an integer >= 1, got {getattr(p, name)!r}")
        if p.sequence_parallel and p.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if p.sequence_parallel and t.seq_len % p.tensor_parallel:
            raise ConfigError(f"parallel.sequence_parallel splits the sequence over the tensor-parallel ranks: "
                              f"train.seq_len={t.seq_len} is not divisible by tensor_parallel={p.tensor_parallel}")
        if self.checkpoint.optimizer_format not in DISTRIBUTED_OPTIMIZER_FORMATS:
            raise ConfigError(f"checkpoint.optimizer_format must be one of "
                              f"{', '.join(DISTRIBUTED_OPTIMIZER_FORMATS)}, got {self.checkpoint.optimizer_format!r}")
        if self.checkpoint.lr_schedule_on_resume not in SCHEDULE_ON_RESUME:
            raise ConfigError(f"checkpoint.lr_schedule_on_resume must be one of {', '.join(SCHEDULE_ON_RESUME)}, "
                              f"got {self.checkpoint.lr_schedule_on_resume!r}")
        if self.checkpoint.load and self.checkpoint.load != "latest" and self.checkpoint.init_from:
            raise ConfigError("checkpoint.load names a checkpoint to resume and checkpoint.init_from "
                              "names weights to start from: give one (load=latest may be combined with "
                              "init_from: resume if save_dir has a checkpoint, else start from init_from)")
        if self.data.streams == [] and not self.data.default_corpus:
            raise ConfigError("data.streams is empty and data.default_corpus is off: no training data")
        self.model.model_args(seq_len=t.seq_len)

    def _validate_values(self) -> None:
        """Values Megatron, torch or the checkpoint code would otherwise refuse late (after the
        model is built), mostly without naming the key."""
        t, c, m = self.train, self.checkpoint, self.model
        for name in ("max_steps", "max_tokens"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (or null), got {getattr(t, name)}")
        if not t.lr > 0.0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if not 0.0 <= t.min_lr <= t.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr={t.lr}], got {t.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
        if not t.adam_eps > 0.0:
            raise ConfigError(f"train.adam_eps must be > 0, got {t.adam_eps}")
        if not t.weight_decay >= 0.0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if t.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
        if t.recompute not in (None, "full", "selective"):
            raise ConfigError(f"train.recompute must be null, full or selective, got {t.recompute!r}")
        if m.spec not in ("auto", "local", "te"):
            raise ConfigError(f"model.spec must be auto, local or te, got {m.spec!r}")
        if m.kernel_backend not in ("auto", "fused", "reference"):
            raise ConfigError(f"model.kernel_backend must be auto, fused or reference, got {m.kernel_backend!r}")
        for name in ("save_interval", "keep_last"):
            if getattr(c, name) is not None and getattr(c, name) < 1:
                raise ConfigError(f"checkpoint.{name} must be >= 1 (or null), got {getattr(c, name)}")
        if c.exit_duration_minutes is not None and not c.exit_duration_minutes > 0:
            raise ConfigError(f"checkpoint.exit_duration_minutes must be > 0 (or null), got {c.exit_duration_minutes}")
        vpp = self.parallel.virtual_pipeline_parallel
        if vpp is not None and vpp < 2:
            raise ConfigError(f"parallel.virtual_pipeline_parallel must be >= 2 (model chunks per pipeline rank) "
                              f"or null (no interleaving), got {vpp}")
        d, lg = self.data, self.logging
        for key in ("streams", "val_streams"):
            if not isinstance(getattr(d, key), list):
                raise ConfigError(f"data.{key} must be a list of streams, e.g. data.{key}=[{{local: /path/to/dataset}}], "
                                  f"got {getattr(d, key)!r}")
        for key, value in self._paths().items():
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{key} must be a path (a string), got {value!r}")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if d.readers_per_node is not None and d.readers_per_node < 1:
            raise ConfigError(f"data.readers_per_node must be >= 1 (or null: from the readers' hosts), "
                              f"got {d.readers_per_node}")
        for name in ("log_interval", "eval_iters"):
            if getattr(lg, name) < 1:
                raise ConfigError(f"logging.{name} must be >= 1, got {getattr(lg, name)}")
        if lg.eval_interval is not None and lg.eval_interval < 0:
            raise ConfigError(f"logging.eval_interval must be >= 0 (0 or null: no evaluation), "
                              f"got {lg.eval_interval}")

    def _paths(self) -> Dict[str, Optional[str]]:
        c, d, lg = self.checkpoint, self.data, self.logging
        return {"checkpoint.save_dir": c.save_dir, "checkpoint.load": c.load, "checkpoint.init_from": c.init_from,
                "data.default_dir": d.default_dir, "data.cache_dir": d.cache_dir,
                "logging.tensorboard_dir": lg.tensorboard_dir, "logging.metrics_jsonl": lg.metrics_jsonl}

    def check_output_paths(self) -> None:
        """Refuse, before anything is built, output paths that cannot be written: a directory
        setting naming a file, a file setting naming a directory, or a path below a file. Otherwise
        the first save (after save_interval steps of training) or the log writers would fail."""
        paths = self._paths()
        directories = ("checkpoint.save_dir", "data.default_dir", "data.cache_dir", "logging.tensorboard_dir")
        for key in directories + ("logging.metrics_jsonl",):
            value = paths[key]
            if not value:
                continue
            path = Path(value)
            if key in directories and path.exists() and not path.is_dir():
                raise ConfigError(f"{key}={value} exists and is not a directory")
            if key == "logging.metrics_jsonl" and path.is_dir():
                raise ConfigError(f"{key}={value} is a directory, not a file")
            blocker = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
            if blocker is not None:
                raise ConfigError(f"{key}={value} cannot be created: {blocker} is a file")

    def layout_for(self, world_size: int):
        """Validate the parallel layout for ``world_size`` GPUs; return (dp, grad_accum_steps)."""
        p, t = self.parallel, self.train
        mp = p.tensor_parallel * p.pipeline_parallel
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tensor_parallel × "
                              f"pipeline_parallel = {p.tensor_parallel} × {p.pipeline_parallel} = {mp}")
        dp = world_size // mp
        args = self.model.model_args(seq_len=t.seq_len)
        if args.num_layers % p.pipeline_parallel:
            raise ConfigError(f"model has {args.num_layers} layers, not divisible by "
                              f"parallel.pipeline_parallel={p.pipeline_parallel}")
        if p.virtual_pipeline_parallel:
            if p.pipeline_parallel < 2:
                raise ConfigError("parallel.virtual_pipeline_parallel needs pipeline_parallel >= 2")
            if args.num_layers % (p.pipeline_parallel * p.virtual_pipeline_parallel):
                raise ConfigError(f"{args.num_layers} layers do not split into pipeline_parallel × "
                                  f"virtual_pipeline_parallel = {p.pipeline_parallel} × "
                                  f"{p.virtual_pipeline_parallel} chunks")
        if args.num_attention_heads % p.tensor_parallel:
            raise ConfigError(f"{args.num_attention_heads} attention heads are not divisible by "
                              f"parallel.tensor_parallel={p.tensor_parallel}")
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"micro_batch_size × data_parallel = {t.micro_batch_size} × {dp} = {per_step}")
        accum = t.global_batch_size // per_step
        if p.virtual_pipeline_parallel and accum % p.pipeline_parallel:
            raise ConfigError(f"interleaved pipelining needs the number of micro-batches ({accum}) to "
                              f"be a multiple of pipeline_parallel={p.pipeline_parallel}")
        return dp, accum

    def total_steps(self) -> int:
        t = self.train
        tokens_per_step = t.global_batch_size * t.seq_len
        steps = []
        if t.max_steps is not None:
            steps.append(int(t.max_steps))
        if t.max_tokens is not None:
            steps.append(max(1, -(-int(t.max_tokens) // tokens_per_step)))
        return min(steps)


def _coerce(section: str, key: str, value, annotation):
    """YAML reads ``3e-3`` and ``100e9`` as strings and ``1e9`` tokens as floats: convert numbers
    to the field's declared type, and refuse values that are not numbers. Booleans must be
    ``true``/``false`` (a typo such as ``flase`` is a non-empty string, which Python would take
    for true), and an empty value (``key=``) is only accepted where the field may be null."""
    text = str(annotation)
    optional = text.startswith("Optional[")
    if value is None:
        if text.startswith("List["):
            return []
        if not optional:
            raise ConfigError(f"{section}.{key} cannot be empty (null); it needs a {text} value")
        return None
    if text in ("bool", "Optional[bool]"):
        if not isinstance(value, bool):
            allowed = "true, false or null" if optional else "true or false"
            raise ConfigError(f"{section}.{key} must be {allowed}, got {value!r}")
        return value
    wants_int = text in ("int", "Optional[int]")
    wants_float = text in ("float", "Optional[float]")
    if not (wants_int or wants_float):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key} must be a number, got {value!r}") from None
    if wants_int:
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{section}.{key} must be an integer, got {value!r}")
        return int(number)
    return number


def _section_from_dict(name: str, values: dict):
    cls = SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(values).__name__}")
    if name == "model":
        fixed = {k: values[k] for k in ("preset", "spec", "kernel_backend") if k in values}
        rest = {k: v for k, v in values.items() if k not in fixed}
        known = {f.name for f in dataclasses.fields(RATPlusModelArgs)}
        unknown = sorted(set(rest) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) model.{', model.'.join(unknown)}; valid: preset, spec, "
                              f"kernel_backend, {', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(RATPlusModelArgs)}
        rest = {k: _coerce(name, k, v, types[k]) for k, v in rest.items()}
        return ModelSection(**fixed, overrides=rest)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid keys of [{name}]: {', '.join(sorted(known))}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{k: _coerce(name, k, v, types[k]) for k, v in values.items()})


def _check_sections(raw: dict) -> None:
    """A recipe's top level: known section names, each a mapping (or empty)."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    for k, v in raw.items():
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"section {k!r} must be a mapping, got {type(v).__name__}")


def config_from_dict(raw: dict) -> RunConfig:
    _check_sections(raw)
    return RunConfig(**{name: _section_from_dict(name, raw.get(name)) for name in SECTIONS})


def apply_overrides(raw: dict, overrides: List[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw recipe dict."""
    _check_sections(raw)
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        if "." not in key:
            raise ConfigError(f"override key {key!r} must be section.key (e.g. train.lr)")
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section {section!r}; valid: {sorted(SECTIONS)}")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}={value}: the value is not valid YAML ({e.problem or e})") from None
        raw.setdefault(section, {})[name] = parsed
    return raw


def load_config(recipe: Optional[str], overrides: List[str] = ()) -> RunConfig:
    raw: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {recipe!r} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {recipe!r} must be a mapping of sections")
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    cfg.validate()
    return cfg
