"""Typed job configuration: the dataclass schemas Hydra composes into.

Every field has a docstring-like comment; a misspelt key or a wrong type fails
before anything starts (see :func:`validate_overrides`, which names the valid
keys). The CLI converts the composed ``DictConfig`` to these dataclasses with
``OmegaConf.to_object`` so the rest of the code sees plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from aitrain.errors import ConfigError

# Config groups whose option is chosen in the primary defaults list (configs/config.yaml).
# `+strategy=fsdp` (what users type) and `strategy=fsdp` must both work: the CLI
# rewrites `+group=option` for these groups (Hydra would say "Multiple values").
DEFAULT_GROUPS = ("strategy", "backend", "tracking", "fabric", "model")


@dataclass
class ModelConfig:
    """The built-in example model: a small GPT-style decoder."""

    name: str = "gpt"  # model family (only the built-in "gpt" for now)
    vocab_size: int = 256  # tokens in the vocabulary
    seq_len: int = 64  # context length in tokens
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    d_model: int = 64  # hidden width
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * d_model
    dropout: float = 0.0  # dropout probability (0 keeps runs deterministic)


@dataclass
class DataConfig:
    """The built-in token dataset, generated deterministically from the seed."""

    kind: str = "markov"  # "markov": tokens from a fixed sparse transition table
    branching: int = 4  # likely successors per token (sets the loss floor ~ln(branching))
    num_sequences: int = 4096  # sequences in one epoch of the synthetic dataset


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 10  # linear warmup steps, then cosine decay to 10%
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    log_every: int = 10  # print a progress line every N steps (metrics go to MLflow every step)
    seed: int = 0  # seed for model init and data


@dataclass
class StrategyConfig:
    """How the model is parallelised (set by the `strategy` group)."""

    name: str = "ddp"  # registered strategy: ddp, fsdp, hsdp, tp, pp, fsdp_tp, fsdp_tp_pp
    mixed_precision: str = "none"  # none | bf16 (bf16 compute, fp32 params and gradient reduce; fp32 if unsupported)
    activation_checkpointing: str = "none"  # none | selective (keep matmul/attention outputs) | full (per block)
    compile: bool = False  # torch.compile each transformer block
    sequence_parallel: bool = False  # TP only: shard norms and the residual stream along the sequence


@dataclass
class PipelineConfig:
    """Pipeline parallelism (used when parallel.pp > 1)."""

    schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble
    microbatches: int = 4  # micro-batches per pipeline step (per train.grad_accum micro-step)
    stages_per_rank: int = 0  # model chunks per pipeline rank (0: 1 for GPipe/1F1B, 2 for interleaved schedules)


@dataclass
class ParallelConfig:
    """Parallel degrees over the DeviceMesh; -1 means "the rest of the world size"."""

    dp_replicate: int = 1  # data-parallel replicas (DDP / HSDP outer dimension)
    dp_shard: int = -1  # FSDP shard degree (-1: world / (dp_replicate * tp * pp))
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel stages


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    every_n_steps: int = 0  # save every N steps and after the last one (0: never)
    # checkpoint root; set it to a fixed path to resume across launches (default: <run_dir>/checkpoints)
    dir: str | None = None
    keep: int = 3  # complete checkpoints kept, oldest removed first (0: keep all)
    # on SIGTERM / Ctrl-C (with every_n_steps > 0) the ranks save a checkpoint and stop; this many seconds
    # from the signal to finish the step and the save, else they stop without it (a second Ctrl-C: at once)
    save_timeout_s: float = 30.0


@dataclass
class SweepConfig:
    """What a sweep (``aitrain launch -m``) optimises: the value each job returns to Hydra's sweeper."""

    objective: str = "loss"  # a metric the job or the user's program logged (metrics.jsonl or its MLflow run)
    objective_mode: str = "last"  # last | min | max | mean_last_N (the mean of the last N values)


@dataclass
class TrackingConfig:
    """Experiment tracking (set by the `tracking` group: mlflow | none)."""

    enabled: bool = True  # false: log nothing
    uri: str | None = None  # MLflow tracking URI (default: sqlite under `run_root`)
    experiment: str = "aitrain"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (default: the run directory's name)
    parent_run_id: str | None = None  # the MLflow run this one belongs under (set for a sweep's jobs)
    system_metrics: bool = True  # sample CPU, memory, network, RDMA and GPU metrics on every node
    system_metrics_interval_s: float = 10.0  # seconds between system metric samples


@dataclass
class FabricConfig:
    """Fabric probe, check and tune (set by the `fabric` group)."""

    check: bool = True  # probe and check the fabric before starting ranks
    on_error: str = "fail"  # fail | warn: what a fabric error does to the launch
    tune: bool = True  # derive NCCL/Gloo env from the probed topology
    interface: str | None = None  # force the socket interface (e.g. ib0)
    expected_rate_gbps: float | None = None  # RDMA ports slower than this are findings
    nccl_version: str | None = None  # NCCL version when torch has none (e.g. 2.21.5)
    env: dict[str, str] = field(default_factory=dict)  # extra env; always wins over tuning
    ib_tc: int | None = None  # NCCL_IB_TC: the traffic class your fabric's QoS expects (None: NCCL's default)
    ib_sl: int | None = None  # NCCL_IB_SL: the InfiniBand service level (None: NCCL's default)
    collective_timeout_s: float = 600.0  # process-group timeout; NCCL_IB_TIMEOUT/RETRY_CNT are fitted inside it
    profile: str = "auto"  # auto: a stored `fabric tune --search` winner matching the cluster | none | a profile file
    smoke: bool = True  # run a short all_reduce with the tuned env before a multi-node launch
    smoke_timeout_s: float = 30.0  # seconds the smoke all_reduce (and each bisection round) may take
    exclude_bad_nodes: bool = False  # launch without the nodes a failed smoke test names (else stop)


@dataclass
class LogConfig:
    """Console output of the ranks (every rank's full output is always kept in the run dir)."""

    ranks: str = "all"  # all | 0 | 0,3: which ranks' lines reach the console
    dedup: bool = True  # collapse identical lines from several ranks into one "[repeated Nx]"


@dataclass
class WatchdogConfig:
    """Hang forensics: act when no rank makes step progress."""

    timeout_s: float = 0.0  # seconds without step progress before stacks are dumped and the job is stopped (0: off)


@dataclass
class ResourcesConfig:
    """Resource control of the ranks on each node."""

    cgroup: bool = False  # run the job in its own cgroup (v2, else v1); killed whole at teardown
    memory_max: str | None = None  # memory limit of the job's cgroup, e.g. 8G (needs resources.cgroup=true)


@dataclass
class ContainerConfig:
    """Run every rank inside a container image (launcher/container.py)."""

    image: str | None = None  # the image (podman: a local image; pyxis: an enroot URI or squashfs; apptainer: a .sif)
    runtime: str = "auto"  # auto | podman | pyxis | apptainer (auto: Pyxis under Slurm if srun has it, else podman)
    mounts: list[str] = field(default_factory=list)  # SRC:DST[:ro]; the run dir and launch dir are always mounted
    workdir: str | None = None  # where the ranks run inside (default: where they run without a container)
    env: list[str] = field(default_factory=list)  # host env names (or PREFIX*) passed in, beyond torch's and tuned
    python: str = "python3"  # the image's interpreter; host: this venv and interpreter mounted read-only


@dataclass
class LocalBackendConfig:
    """Run all ranks on this machine under torch's elastic agent."""

    name: str = "local"
    max_restarts: int = 0  # elastic restarts of the whole worker group on failure
    monitor_interval: float = 0.1  # seconds between health checks of the ranks
    start_method: str = "spawn"  # how ranks start: spawn (entrypoint module) processes


@dataclass
class JobConfig:
    """One training job: what to run, where, and how."""

    nnodes: int = 1  # nodes (torchrun's --nnodes)
    # ranks per node, as torchrun's --nproc-per-node: N | auto (one per GPU, else per CPU) | gpu | cpu
    nproc_per_node: Any = 2
    dry_run: bool = False  # print the plan (config, commands, env per rank) and start nothing
    # The rank program instead of the built-in job (also `aitrain launch ... -- train.py ARGS`):
    script: str | None = None  # a torchrun-compatible script (relative to the launch directory)
    module: str | None = None  # or a module run as `python -m MODULE` (`-- -m pkg.mod ARGS`)
    script_args: list[str] = field(default_factory=list)  # arguments of `script`/`module`, as typed
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: str = "auto"  # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    run_root: str = "outputs"  # where run directories and the embedded MLflow store live
    run_dir: str | None = "${hydra:runtime.output_dir}"  # this launch's directory (set by Hydra)
    resume: str = "none"  # none | auto (latest complete checkpoint) | <path>
    binding: str = "none"  # numa | core | none: give each local rank a disjoint CPU set
    profile: str = "none"  # none | perf (perf stat per rank) | pyspy (flame graph per rank)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pp: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    log: LogConfig = field(default_factory=LogConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    # Set by the `backend` group (local | slurm); typed per option, so no default schema here:
    # a default dataclass would make OmegaConf reject every other backend's schema.
    backend: Any = "???"


@dataclass
class SlurmBackendConfig:
    """Submit to Slurm with sbatch (or, inside an allocation, run one agent per node with srun)."""

    name: str = "slurm"
    partition: str | None = None  # --partition
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    time: str | None = None  # --time, e.g. 04:00:00
    gpus_per_node: int | None = None  # --gpus-per-node (default: none requested)
    cpus_per_node: int | None = None  # --cpus-per-task of the one task per node (the node agent)
    mem: str | None = None  # --mem per node, e.g. 200G
    constraint: str | None = None  # --constraint
    exclusive: bool = False  # --exclusive
    job_name: str | None = None  # --job-name (default: aitrain-<strategy>)
    extra_sbatch: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. ['--reservation=x']
    signal: str = "USR1"  # signal Slurm sends before the time limit: ranks checkpoint and the job requeues
    signal_lead_s: int = 120  # seconds before the time limit that the signal is sent
    max_requeues: int = 3  # requeues after preemption/time limit before giving up
    python: str | None = None  # interpreter on the compute nodes (default: this one)
    srun_args: list[str] = field(default_factory=list)  # extra srun arguments for the agent step


@dataclass
class RayBackendConfig:
    """Run on a Ray cluster: one actor per rank in a placement group (launcher/backends/ray.py)."""

    name: str = "ray"
    # unset: RAY_ADDRESS, else a running local cluster, else a Ray started for this job; host:port | auto |
    # ray://head:10001 (Ray client) | http://head:8265 (Jobs API: submit, print a handle)
    address: str | None = None
    # spread | pack | strict_spread | strict_pack: how the per-node bundles go on Ray nodes
    placement: str = "spread"
    cpus_per_worker: float = 1.0  # CPUs each rank's actor reserves
    gpus_per_worker: float = 0.0  # GPUs each rank's actor reserves (a node's ranks all see that node's GPUs)
    # custom Ray resources per rank, e.g. {accel_h100: 1}
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # restarts of the whole group after a failure (the built-in job resumes from its latest checkpoint)
    max_failures: int = 0
    # seconds to wait for the placement group before giving up with the cluster's resources
    placement_timeout_s: float = 120.0
    # Ray runtime_env of the job (env_vars, working_dir, pip, ...)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    python: str | None = None  # interpreter of the Jobs API entrypoint on the cluster (default: this one)
    # CPUs of the Ray instance aitrain starts when there is no cluster (default: enough for the job)
    num_cpus: int | None = None


# Schemas for the `backend` group: one per backend, so `backend.partition` is a
# typo under `backend=local` and valid under `backend=slurm`.
BACKEND_SCHEMAS: dict[str, type] = {"local": LocalBackendConfig, "slurm": SlurmBackendConfig,
                                    "ray": RayBackendConfig}

# The package of aitrain's own Hydra configs (configs/ in the source tree).
CONFIG_MODULE = "aitrain.configs"

# Keys under these paths are free-form (maps of user values).
FREE_FORM = ("fabric.env", "backend.resources_per_worker", "backend.runtime_env")


def register_configs() -> None:
    """Register the schema and the backend options with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for name, schema in BACKEND_SCHEMAS.items():
        cs.store(group="backend", name=name, node=schema)


# ---------------------------------------------------------------------------
# Loud typos: check every override key against the schema before Hydra runs.


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass schema (for help and error messages)."""
    keys = []
    for name, tp in _field_types(cls).items():
        tp = _unwrap(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys.extend(schema_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def backend_options(schema: Any, options: dict[str, Any], what: str) -> Any:
    """A backend's config from keyword options (``SlurmBackend(partition=...)``): unknown
    options fail, naming the valid ones."""
    valid = {f for f in schema.__dataclass_fields__ if f != "name"}
    unknown = set(options) - valid
    if unknown:
        raise ConfigError(f"unknown {what} backend options: {', '.join(sorted(unknown))}",
                          f"valid: {', '.join(sorted(valid))}")
    return schema(**options)


def check_key(key: str, backend: str = "local") -> None:
    """Raise ConfigError if `key` (dotted) is not in the schema; name the valid keys."""
    if key.startswith("hydra.") or key == "hydra":
        return
    if any(key == p or key.startswith(p + ".") for p in FREE_FORM):
        return
    parts = key.split(".")
    cls: Any = JobConfig
    path: list[str] = []
    for part in parts:
        types = _field_types(cls)
        if part == "backend" and cls is JobConfig:
            types["backend"] = BACKEND_SCHEMAS.get(backend, LocalBackendConfig)
        if part not in types:
            where = ".".join(path) or "the top level"
            valid = sorted(types)
            close = difflib.get_close_matches(part, valid, n=1)
            full_close = ".".join(path + close) if close else None
            hint = f"did you mean '{full_close}'? " if full_close else ""
            raise ConfigError(
                f"unknown config key '{key}': '{part}' is not a key of {where}. "
                f"Valid keys there: {', '.join(valid)}.",
                hint + "`aitrain launch --help` lists every group and option; "
                "`aitrain launch --cfg job` prints the composed config.",
            )
        path.append(part)
        tp = _unwrap(types[part])
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif part != parts[-1]:
            # Descending into a leaf (e.g. train.lr.x) is a typo too.
            raise ConfigError(
                f"unknown config key '{key}': '{'.'.join(path)}' is a value, not a group.",
                f"set it directly, e.g. {'.'.join(path)}=...",
            )


def _closed_schema_error(key: str, e: ConfigError, *, added: bool, groups: dict[str, list[str]]) -> ConfigError:
    """A name that is neither in the schema nor a config group Hydra sees: the schema's error,
    saying that the schema is closed (`+key=`) and, for a top-level name, which groups there are."""
    free_form = (f"free-form keys go under {', '.join(FREE_FORM)} (e.g. +fabric.env.MY_VAR=1); "
                 "your own program's options go after `--` (aitrain launch -- train.py --my-option 1)")
    user = sorted(g for g in groups if not g.startswith("hydra"))
    if "." not in key and added:  # +experiment=fast: a group the user meant to bring, or a new key
        close = difflib.get_close_matches(key, user + sorted(_field_types(JobConfig)), n=1)
        return ConfigError(
            f"'{key}' is neither a config group nor a config key. Config groups: {', '.join(user)}. "
            f"Keys: {', '.join(sorted(_field_types(JobConfig)))}.",
            (f"did you mean '{close[0]}'? " if close else "")
            + f"your own groups (e.g. {key}/NAME.yaml) come from --config-dir/-cd DIR or "
            f"hydra.searchpath=[file://DIR]; the config schema is closed: {free_form}")
    if "." not in key:
        return ConfigError(f"{e.message} Config groups: {', '.join(user)}.", e.hint)
    if added:
        return ConfigError(f"cannot add '{key}': the config schema is closed (every key is typed in JobConfig). "
                           f"{e.message}", free_form)
    return e


def validate_overrides(overrides: list[str], *, config_dir: str | None = None,
                       config_name: str | None = None) -> None:
    """Check the keys of Hydra overrides against the schema (before composition), so a typo
    fails before anything starts.

    Group selections (`strategy=fsdp`, `hydra/launcher=joblib`, `+experiment=fast` from the
    user's `--config-dir`) are left to Hydra, which lists a group's options; a name that is
    neither a key nor a group Hydra sees (:func:`hydra_groups`) is an error listing both.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's OverrideParseException
        raise ConfigError(f"could not parse overrides {overrides}: {e}",
                          "overrides look like train.lr=1e-3, +group=option or strategy=fsdp") from e
    backend = "local"
    for o in parsed:
        if o.key_or_group == "backend" and o.package is None:
            value = o.value()
            if isinstance(value, str):
                backend = value
    groups: dict[str, list[str]] | None = None

    def known_groups() -> dict[str, list[str]]:  # asked of Hydra only when the schema does not know a name
        nonlocal groups
        if groups is None:
            searchpath = [o.input_line for o in parsed if o.get_key_element() == "hydra.searchpath"]
            groups = hydra_groups(config_dir=config_dir, config_name=config_name,
                                  overrides=[s for s in searchpath if s is not None])
        return groups

    for o in parsed:
        key = o.key_or_group
        if key in DEFAULT_GROUPS or key.split("/")[0] in DEFAULT_GROUPS and "/" in key:
            continue
        if "/" in key:  # only a group can be named with a slash
            if key.strip("/") not in known_groups():
                raise _unknown_group(key, known_groups())
            continue
        try:
            check_key(key, backend)
        except ConfigError as e:
            if key in known_groups():  # the user's own group: +experiment=fast
                continue
            raise _closed_schema_error(key, e, added=o.is_add() or o.is_force_add(), groups=known_groups()) from None


def _unknown_group(group: str, groups: dict[str, list[str]]) -> ConfigError:
    valid = sorted(groups)
    close = difflib.get_close_matches(group, valid, n=1)
    return ConfigError(
        f"unknown config group '{group}'. Config groups: {', '.join(valid)}.",
        (f"did you mean '{close[0]}'? " if close else "")
        + "your own groups come from --config-dir/-cd DIR or hydra.searchpath=[...]; "
        "Hydra's launcher and sweeper plugins from installed hydra_plugins packages")


def hydra_search_path(config_dir: str | None = None) -> Any:
    """The config search path `aitrain launch` gives Hydra: Hydra's own configs, aitrain's,
    the installed hydra_plugins' SearchPathPlugins, `--config-dir` (as Hydra adds it) and the
    ConfigStore (aitrain's schemas, and every installed plugin's configs once Hydra has
    scanned hydra_plugins)."""
    import os

    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    register_configs()
    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise ConfigError(f"--config-dir {config_dir}: no such directory ({path})",
                              "give --config-dir/-cd a directory of your own config groups")
        search_path.prepend(provider="command-line", path=f"file://{path}",
                            anchor=SearchPathQuery(provider="schema"))
    return search_path


def hydra_groups(*, config_dir: str | None = None, config_name: str | None = None,
                 overrides: list[str] | None = None) -> dict[str, list[str]]:
    """Every config group Hydra sees for this launch -> its options, as Hydra's own config
    loader lists them (`hydra.searchpath` from the primary config or `overrides` included)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.object_type import ObjectType

    loader = ConfigLoaderImpl(config_search_path=hydra_search_path(config_dir))
    try:
        # The repository Hydra composes from, hydra.searchpath applied (hydra-core 1.3's own step;
        # its public get_group_options does the same but rebuilds the repository on every call).
        _, repo = loader._parse_overrides_and_create_caching_repo(config_name or "config", overrides or [])
        groups: dict[str, list[str]] = {}
        parents = [""]
        while parents:
            parent = parents.pop()
            for child in repo.get_group_options(parent, ObjectType.GROUP):
                group = f"{parent}/{child}" if parent else child
                groups[group] = repo.get_group_options(group, ObjectType.CONFIG)
                parents.append(group)
    except Exception as e:  # a bad hydra.searchpath, an unreadable config dir ...
        raise ConfigError(f"cannot list the config groups: {e}",
                          "hydra.searchpath=[...] takes a list of file:// or pkg:// paths") from e
    return groups


def to_job_config(cfg: Any) -> JobConfig:
    """Composed DictConfig -> JobConfig dataclass (the CLI edge)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, JobConfig), type(obj)
    return obj


def job_config_from_dict(d: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from its resolved dict (what ranks read from the run dir)."""
    from omegaconf import OmegaConf

    backend = d.get("backend", {}) or {}
    schema = BACKEND_SCHEMAS.get(backend.get("name", "local"), LocalBackendConfig)
    base = OmegaConf.structured(JobConfig)
    base.run_dir = "."  # the Hydra interpolation only resolves inside `aitrain launch`
    base.backend = OmegaConf.structured(schema)
    merged = OmegaConf.merge(base, d)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, JobConfig)
    return obj
