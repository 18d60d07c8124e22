"""Training configuration: one dataclass with a section per concern, read from TOML/JSON/YAML and `key=value` overrides.

The defaults are the debug preset on the built-in corpus, so `llama3 train` with no arguments trains something small
on a laptop. Sizes that describe the batch are global (the same whatever the parallel layout), so one config gives
the same training run on 1 process or on a dp x tp x pp mesh.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A bad training configuration: the message names the key (and file) and what is wrong."""


@dataclass
class RunConfig:
    dir: str | None = None  # output directory; None: runs/<preset>-<date>-<time>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class ModelConfig:
    preset: str = "debug"  # a ModelArgs preset name
    args: dict = field(default_factory=dict)  # ModelArgs fields overriding the preset, e.g. model.args.n_layers=2
    init_from: str | None = None  # start from these weights (any checkpoint llama3.load reads) instead of random
    init_std: float = 0.02


@dataclass
class DataConfig:
    dataset: str = "default"  # "default" (built-in corpus), "synthetic" (random, learnable), or a prepared data dir
    seq_len: int = 256
    document_masking: bool = False  # attention stays inside each document, positions restart at each document
    val_fraction: float = 0.01  # documents held out for validation


@dataclass
class TrainingConfig:
    steps: int = 300
    batch_size: int = 8  # global sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward on one data-parallel rank; None: batch_size / dp
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    # fp32 on CPU without tensor parallelism: every linear's matmuls (forward and backward) through oneDNN, which
    # runs them ~2x faster than torch's default (MKL) on AMD CPUs; see llama3/fast.py.
    onednn_linears: bool = True
    log_every: int = 1


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_ratio: float = 0.2  # wsd: the last fraction of the steps that decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # data-parallel replicas (DDP; with dp_shard > 1 as well: HSDP)
    dp_shard: int = -1  # FSDP degree; -1: whatever is left of the world after the other degrees
    tp: int = 1  # tensor parallel (with sequence parallel)
    pp: int = 1  # pipeline stages
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = "1f1b"
    pp_microbatches: int | None = None  # per micro batch; None: the number of pipeline stages
    pp_stages_per_rank: int = 2  # interleaved-1f1b only
    loss_parallel: bool = True  # with tp: the output projection stays sharded over the vocabulary into the loss


@dataclass
class EvalConfig:
    every: int = 50  # validation every N steps (0: only at the end, negative: never)
    steps: int = 4  # global batches (training.batch_size sequences) of validation data per evaluation
    at_start: bool = False  # also validate before the first step (the starting model's loss)


@dataclass
class CheckpointConfig:
    enabled: bool = True  # training checkpoints: model, optimizer, schedule and data position, to resume from
    # a training checkpoint every N steps (0: only at the end); "auto": at the Young/Daly interval
    # sqrt(2 x save cost x mean time between faults), from the measured save cost and faults.mtbf_minutes
    every: int | Literal["auto"] = 0
    keep: int = 2  # most recent training checkpoints to keep
    resume: bool = True  # continue from the latest training checkpoint in the run directory, if there is one
    every_minutes: float = 0.0  # also a checkpoint whenever this much wall time passed since the last (0: off)
    async_save: bool = False  # write in the background while training goes on (see docs/RELIABILITY.md)
    # the newest state also in RAM every N steps (0: off): NaN and corruption rollbacks restore it without disk
    memory_every: int = 10
    export: bool = True  # at the end, write the model where `llama3.load` and `llama3 chat` read it (<dir>/model)
    export_layout: Literal["hf", "meta"] = "hf"  # Hugging Face safetensors or Meta consolidated.00.pth


@dataclass
class FaultsConfig:
    """Detection of and recovery from faults (docs/RELIABILITY.md), and the injector that proves it works."""
    max_bad_steps: int = 3  # non-finite or spiking steps in a row that are skipped before rolling back
    spike_zscore: float = 0.0  # a loss this many standard deviations above the recent mean is a spike (0: off)
    spike_window: int = 50  # recent good steps the spike statistics are taken over
    skip_steps: list[int] = field(default_factory=list)  # steps whose batch is consumed without an update
    watchdog_timeout_s: float = 0.0  # a step (or save) longer than this dumps stacks and exits (0: off)
    # the same for each start-up phase: rendezvous and process group, model build, checkpoint load (0: off)
    startup_timeout_s: float = 0.0
    fingerprint_every: int = 0  # compare data-parallel replicas' parameter fingerprints every N steps (0: off)
    inject: list[str] = field(default_factory=list)  # e.g. "kill:step=7:rank=1"; also $LLAMA3_FAULTS
    # the expected time between faults, for checkpoint.every="auto" (0: measured, this run's wall time per fault)
    mtbf_minutes: float = 0.0


@dataclass
class FTConfig:
    """Replica groups kept in step by torchft: a dead group is dropped from the quorum and the others go on without
    restarting; it comes back by copying a live peer's state (llama3/train/ft.py, docs/RELIABILITY.md)."""
    replicas: int = 0  # data-parallel replica groups, one process each (0: off; the torchrun path)
    replica_id: int | None = None  # which group this process is (set by `llama3 train`'s launcher, or by hand)
    groups: list[int] | None = None  # the groups this host's launcher starts and restarts (None: all of them)
    lighthouse: str | None = None  # http://HOST:PORT of the quorum server; None: `llama3 train` serves one
    host: str = "127.0.0.1"  # the address the other groups reach this one at (across hosts: this host's)
    timeout_s: float = 2.0  # a collective slower than this fails the step; the group that is late is dropped
    heartbeat_timeout_s: float = 1.0  # the lighthouse drops a group it has not heard from for this long
    join_timeout_s: float = 60.0  # at a fresh start, wait this long for every group before the first step
    max_restarts: int = 20  # how often the launcher restarts a group that died, over the run
    spares: int = 1  # processes the launcher keeps started (imports done) to take a dead group's place at once


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None  # per-device peak for MFU; None: measured with a matmul at start
    tensorboard: bool = True  # if the tensorboard package is installed
    plot: bool = True  # loss curve PNG at the end (needs matplotlib)


@dataclass
class LoopConfig:
    """The sections of the training loop itself, shared by pretraining and fine-tuning."""
    run: RunConfig = field(default_factory=RunConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    ft: FTConfig = field(default_factory=FTConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining: the loop's sections plus the model to build and the token data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def model_args(self):
        from ..args import ModelArgs
        try:
            return ModelArgs.preset(self.model.preset, **self.model.args)
        except TypeError as e:  # an unknown field name in model.args
            raise ConfigError(f"model.args: {e}") from None
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None


def apply_overrides(cfg, overrides: list[str]) -> None:
    """`section.key=value` items (values are TOML literals) applied in order to a config dataclass."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        set_key(cfg, key.strip(), parse_value(text.strip()), source="command line")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the file (TOML, JSON or YAML by extension), then `section.key=value` overrides in order."""
    cfg = TrainConfig()
    if path is not None:
        apply_dict(cfg, read_config_file(Path(path)), source=str(path))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml
            return yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except ImportError:
        raise ConfigError(f"{path}: reading YAML needs the PyYAML package") from None
    except Exception as e:  # yaml.YAMLError without importing yaml up front
        raise ConfigError(f"{path}: {e}") from None
    raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml, .json or .yaml")


def parse_value(text: str):
    """A TOML literal (1, 2.5e-4, true, "x", [1, 2], {a = 1}); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_dict(cfg: TrainConfig, values: dict, source: str, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a table of keys")
    for key, value in values.items():
        set_key(cfg, prefix + key, value, source)


def set_key(cfg: TrainConfig, key: str, value, source: str) -> None:
    """Set `section.name` (or `model.args.name`) to value, checked against the field's type."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{source}: unknown key {key!r} ({where} has: {', '.join(fields)})")
        current = getattr(obj, part)
        rest = parts[i + 1:]
        if dataclasses.is_dataclass(current):
            if not rest:
                apply_dict(cfg, value, source, prefix=key + ".")
                return
            obj = current
            continue
        if isinstance(current, dict):  # free-form table (model.args): the model checks the names
            if rest:
                current[".".join(rest)] = value
            elif isinstance(value, dict):
                current.update(value)
            else:
                raise ConfigError(f"{source}: {key} must be a table, got {value!r}")
            return
        if rest:
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])} is a value, not a section")
        hint = typing.get_type_hints(type(obj))[part]
        setattr(obj, part, check_type(value, hint, key, source))
        return


def check_type(value, hint, key: str, source: str):
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in params:
                return None
        errors = []
        for p in params:
            if p is type(None):
                continue
            try:
                return check_type(value, p, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list; got {value!r}")
        return [check_type(v, params[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is Literal:
        if value not in params:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, params))}; got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false; got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key} must be an integer; got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}; got {value!r}")
    return value


def validate_loop(cfg: LoopConfig) -> None:
    """The checks of the loop's own sections, for pretraining and fine-tuning alike."""
    t, p, o = cfg.training, cfg.parallel, cfg.optim
    positive = {"training.steps": (t.steps, 0), "training.batch_size": (t.batch_size, 1),
                "parallel.tp": (p.tp, 1), "parallel.pp": (p.pp, 1),
                "parallel.dp_replicate": (p.dp_replicate, 1), "training.log_every": (t.log_every, 1),
                "optim.warmup_steps": (o.warmup_steps, 0), "eval.steps": (cfg.eval.steps, 1),
                "checkpoint.every": (0 if cfg.checkpoint.every == "auto" else cfg.checkpoint.every, 0),
                "checkpoint.memory_every": (cfg.checkpoint.memory_every, 0), "ft.replicas": (cfg.ft.replicas, 0),
                "checkpoint.keep": (cfg.checkpoint.keep, 1),
                "faults.max_bad_steps": (cfg.faults.max_bad_steps, 1),
                "faults.spike_window": (cfg.faults.spike_window, 2),
                "faults.fingerprint_every": (cfg.faults.fingerprint_every, 0)}
    for key, (value, least) in positive.items():
        if value < least:
            raise ConfigError(f"{key} must be at least {least}; got {value}")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"parallel.dp_shard must be -1 or at least 1; got {p.dp_shard}")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ConfigError(f"training.micro_batch_size must be at least 1; got {t.micro_batch_size}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1]; got {o.min_lr_ratio}")
    if not 0 < o.decay_ratio <= 1:
        raise ConfigError(f"optim.decay_ratio must be in (0, 1]; got {o.decay_ratio}")
    parse_faults(cfg.faults.inject, key="faults.inject")
    if cfg.ft.replicas:
        if cfg.ft.replica_id is not None and not 0 <= cfg.ft.replica_id < cfg.ft.replicas:
            raise ConfigError(f"ft.replica_id {cfg.ft.replica_id} must be in [0, ft.replicas={cfg.ft.replicas})")
        if cfg.ft.groups is not None and (not cfg.ft.groups or not all(
                0 <= g < cfg.ft.replicas for g in cfg.ft.groups) or len(set(cfg.ft.groups)) < len(cfg.ft.groups)):
            raise ConfigError(f"ft.groups {cfg.ft.groups} must name distinct groups in [0, ft.replicas="
                              f"{cfg.ft.replicas})")
        if cfg.ft.groups is not None and cfg.ft.lighthouse is None:
            raise ConfigError("ft.groups (some of the groups on this host) needs ft.lighthouse, the quorum server "
                              "every host's groups reach (python -m llama3.train.ft lighthouse)")
        if t.batch_size % cfg.ft.replicas:
            raise ConfigError(f"training.batch_size {t.batch_size} must be a multiple of ft.replicas "
                              f"{cfg.ft.replicas}")
        if p.dp_replicate * p.tp * p.pp != 1 or p.dp_shard != -1:
            raise ConfigError("ft.replicas: each replica group is one process here; parallel.* must stay 1")


def validate(cfg: TrainConfig) -> None:
    validate_loop(cfg)
    if cfg.data.seq_len < 1:
        raise ConfigError(f"data.seq_len must be at least 1; got {cfg.data.seq_len}")
    args = cfg.model_args()
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} is longer than the model's max_seq_len "
                          f"{args.max_seq_len}")


FAULT_KINDS = ("kill", "nan", "hang", "corrupt_checkpoint", "bitflip", "fail_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int  # fires just before this (1-based) step runs
    rank: int | None = None  # None: every rank (kill, hang and bitflip default to rank 0)


def parse_faults(specs: list[str], key: str = "faults") -> list[Fault]:
    """"kind:step=S[:rank=R]" strings -> Faults; a bad spec is a ConfigError naming it."""
    faults = []
    for spec in specs:
        kind, *fields = spec.strip().split(":")
        values = {}
        for f in fields:
            name, sep, value = f.partition("=")
            if not sep or name not in ("step", "rank") or not value.strip().isdigit():
                raise ConfigError(f"{key}: bad fault {spec!r}: expected kind:step=S[:rank=R]")
            values[name] = int(value)
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{key}: unknown fault kind {kind!r} in {spec!r}; one of {', '.join(FAULT_KINDS)}")
        if "step" not in values:
            raise ConfigError(f"{key}: fault {spec!r} needs step=S")
        rank = values.get("rank", 0 if kind in ("kill", "hang", "bitflip", "corrupt_checkpoint") else None)
        faults.append(Fault(kind, values["step"], rank))
    return faults


@dataclass(frozen=True)
class Layout:
    """The parallel degrees resolved against the world size, and what they imply for the batch."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch_size: int
    grad_accum: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def split_batch(p: ParallelConfig, t: TrainingConfig, world_size: int) -> Layout:
    """The data-parallel degree (what tp and pp leave of the processes) and the batch split it implies: micro
    batch per rank and gradient accumulation steps."""
    fixed = p.dp_replicate * p.tp * p.pp
    dp_shard = p.dp_shard if p.dp_shard != -1 else world_size // fixed
    if dp_shard < 1 or fixed * dp_shard != world_size:
        raise ConfigError(f"parallel: dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp {p.pp} "
                          f"does not match the {world_size} processes")
    dp = p.dp_replicate * dp_shard
    micro = t.micro_batch_size or t.batch_size // dp
    if micro < 1 or t.batch_size % (micro * dp):
        raise ConfigError(f"training.batch_size {t.batch_size} must be a multiple of micro_batch_size x dp "
                          f"({micro} x {dp})")
    return Layout(p.dp_replicate, dp_shard, p.tp, p.pp, micro, t.batch_size // (micro * dp))


def resolve_layout(cfg: LoopConfig, world_size: int, args=None) -> Layout:
    """The layout of `cfg` on `world_size` processes for the model `args` (default: the config's own), checked
    against what tensor and pipeline parallelism need of the model and the sequence length."""
    p = cfg.parallel
    layout = split_batch(p, cfg.training, world_size)
    micro = layout.micro_batch_size
    if p.pp > 1:
        n_micro = p.pp_microbatches or p.pp
        if n_micro < 1 or micro % n_micro:
            raise ConfigError(f"parallel.pp_microbatches {n_micro} must divide the micro batch of {micro} sequences")
        if p.pp_schedule == "1f1b" and n_micro < p.pp:
            raise ConfigError(f"parallel.pp_microbatches {n_micro}: 1F1B needs at least one per stage ({p.pp})")
        rounds = max(1, n_micro // p.pp)
        if p.pp_schedule == "interleaved-1f1b" and n_micro % rounds:
            raise ConfigError(f"parallel.pp_microbatches {n_micro}: interleaved 1F1B needs a multiple of {rounds}")
    args = args or cfg.model_args()
    for name, heads in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if heads % p.tp:
            raise ConfigError(f"parallel.tp {p.tp} must divide the model's {name} ({heads})")
    if p.tp > 1 and cfg.data.seq_len % p.tp:
        raise ConfigError(f"parallel.tp {p.tp} must divide data.seq_len {cfg.data.seq_len} (sequence parallel)")
    stages = p.pp * (p.pp_stages_per_rank if p.pp_schedule == "interleaved-1f1b" else 1)
    if stages > args.n_layers:
        raise ConfigError(f"{stages} pipeline stages need at least as many layers; the model has {args.n_layers}")
    if p.pp > 1 and args.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs untied embeddings: the first and last stage would share a weight")
    return layout
