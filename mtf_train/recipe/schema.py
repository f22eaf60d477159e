"""The typed recipe schema: the one place that holds every field's type, default and documentation.

Loading (`load.py`) turns merged YAML into these dataclasses, validation (`validate.py`) checks the
cross-field rules, and `docs/recipe.md` is generated from the `doc` strings below.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Optional


def f(default: Any = MISSING, doc: str = "", *, factory: Any = None, min: float | None = None,
      gt: float | None = None) -> Any:
    """A schema field: its default, its one-line documentation and simple numeric bounds."""
    meta = {"doc": doc, "min": min, "gt": gt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Model:
    family: Literal["bloom"] = f("bloom", "Model family. BLOOM: ALiBi, embedding layer norm, fused QKV, tied embeddings.")
    num_layers: int = f(2, "Transformer blocks (`--num-layers`).", min=1)
    hidden_size: int = f(64, "Hidden size (`--hidden-size`).", min=1)
    num_attention_heads: int = f(4, "Attention heads (`--num-attention-heads`).", min=1)
    seq_length: int = f(128, "Tokens per packed row seen by the model (`--seq-length`).", min=1)
    max_position_embeddings: Optional[int] = f(None, "Longest sequence the model supports; defaults to seq_length.", min=1)
    pad_vocab_size_to: Optional[int] = f(None, "Pad the vocabulary to exactly this size (BLOOM: 250880).", min=1)
    make_vocab_size_divisible_by: int = f(128, "Otherwise pad the vocabulary to a multiple of this times tp.", min=1)
    vocab_size: Optional[int] = f(None, "Tokenizer vocabulary before padding; read from the tokenizer when unset "
                                  "(planning uses pad_vocab_size_to or this).", min=1)
    position_embedding_type: Literal["alibi", "absolute"] = f(
        "alibi", "Positions. Packed MTF rows need ALiBi: absolute positions are not reset per example.")
    embed_layernorm: bool = f(True, "Layer norm right after the word embeddings (`--embed-layernorm`).")
    init_method_std: float = f(0.0048, "Standard deviation of the weight initialisation.", gt=0)
    hidden_dropout: float = f(0.0, "Dropout after attention and MLP outputs.", min=0)
    attention_dropout: float = f(0.0, "Dropout on attention probabilities.", min=0)
    layernorm_epsilon: float = f(1e-5, "Layer norm epsilon.", gt=0)


@dataclass
class Parallel:
    pp: int = f(1, "Pipeline-parallel degree (`--pipeline-model-parallel-size`).", min=1)
    tp: int = f(1, "Tensor-parallel degree (`--tensor-model-parallel-size`).", min=1)
    dp: Optional[int] = f(None, "Data-parallel degree; derived as world_size / (pp * tp) when unset.", min=1)
    partition_method: str = f("type:transformer|embedding",
                              "How layers are split among pipeline stages (`--pp-partition-method`): "
                              "`type:transformer|embedding` counts the two tied-embedding units, "
                              "`type:transformer` only blocks, `uniform` every layer.")
    sync_tp_duplicated_parameters: bool = f(True, "Keep tensor-parallel replicated parameters (layer norms, "
                                            "row-parallel biases) in sync (`--sync-tp-duplicated-parameters`).")


@dataclass
class Rampup:
    start: int = f(32, "Global batch size at the first step.", min=1)
    increment: int = f(32, "Batch size added at each ramp-up step.", min=1)
    samples: int = f(1000, "Samples over which the batch ramps up to `batch.global`.", min=1)


@dataclass
class Batch:
    micro: int = f(1, "Micro batch per GPU (`--micro-batch-size`).", min=1)
    global_: int = f(8, "Global batch in samples (`--global-batch-size`). YAML key: `global`.", min=1)
    rampup: Optional[Rampup] = f(None, "Optional batch-size ramp-up (`--rampup-batch-size START INC SAMPLES`).")


@dataclass
class Precision:
    dtype: Literal["fp32", "bf16", "fp16"] = f("fp32", "Training precision. fp16 needs GPUs; bf16 and fp32 run on CPU too.")
    zero_stage: Literal[0, 1] = f(1, "DeepSpeed ZeRO stage (`--zero-stage`). The built-in runtime needs 1 with bf16.")
    loss_scale: float = f(0, "fp16 static loss scale; 0 = dynamic.", min=0)
    initial_scale_power: int = f(12, "fp16 dynamic loss scale starts at 2**this.", min=0)
    loss_scale_window: int = f(500, "fp16: steps without overflow before the scale grows.", min=1)
    hysteresis: int = f(2, "fp16: overflows tolerated before the scale shrinks.", min=1)
    min_loss_scale: float = f(1, "fp16: smallest dynamic loss scale.", gt=0)


@dataclass
class Optimizer:
    name: Literal["adam"] = f("adam", "Optimizer (`--optimizer`).")
    lr: float = f(2e-5, "Peak learning rate (`--lr`).", gt=0)
    min_lr: float = f(0.0, "Floor of the decayed learning rate (`--min-lr`).", min=0)
    beta1: float = f(0.9, "Adam beta1.", min=0)
    beta2: float = f(0.95, "Adam beta2.", min=0)
    eps: float = f(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = f(1e-4, "Weight decay (`--weight-decay`).", min=0)
    clip_grad: float = f(1.0, "Gradient-norm clipping; 0 disables (`--clip-grad`).", min=0)
    schedule: Literal["constant", "linear", "cosine"] = f("constant", "Learning-rate decay style (`--lr-decay-style`).")
    warmup_samples: int = f(0, "Linear warm-up length in samples (`--lr-warmup-samples`).", min=0)
    decay_samples: Optional[int] = f(None, "Decay length in samples; defaults to the training length.", min=1)


@dataclass
class Training:
    train_samples: Optional[int] = f(None, "Training length in samples (`--train-samples`). Give this or train_iters.", min=1)
    train_iters: Optional[int] = f(None, "Training length in steps (`--train-iters`).", min=1)
    seed: int = f(42, "Random seed (`--seed`).", min=0)
    norm_target_loss: bool = f(True, "Weight every example equally in the loss (`--norm-target-loss`).")
    recompute: Literal["auto", "none", "selective", "full"] = f(
        "auto", "Activation recomputation per block (`--recompute`): none; selective (keep the linear layers' "
        "outputs, recompute layer norms, GeLU and the attention core); full (keep only each block's input, "
        "`--checkpoint-activations`). auto: the least recomputation whose planned peak memory fits "
        "cluster.gpu_memory_gb with 10% headroom (full with runtime megatron_deepspeed, as in 2022).")
    checkpoint_activations: Optional[bool] = f(None, "finetune_t0's switch, for older recipes: true = recompute "
                                               "full, false = recompute none.")
    compile: Optional[bool] = f(None, "torch.compile each transformer block (`--compile` / `--no-compile`); unset: "
                                "on GPUs yes, on CPU no (compiling costs more CPU time than it saves there).")
    fused_kernels: bool = f(False, "Require the fused softmax kernels' limits and abort when unmet "
                            "(`--abort-on-unmet-fused-kernel-constraints`).")
    exit_duration_in_mins: Optional[float] = f(None, "Save and exit after this many minutes; derived from "
                                             "cluster.time minus cluster.save_margin_mins when unset.", gt=0)
    exit_interval: Optional[int] = f(None, "Save and exit at a step divisible by this (`--exit-interval`).", min=1)


@dataclass
class ZeroShot:
    tasks: list[str] = f(factory=list, doc="Task families to evaluate (`xcopa`, `xnli`, `xstorycloze`, `xwinograd`); "
                         "empty = all four.")
    languages: list[str] = f(factory=list, doc="Languages to evaluate (e.g. `[fr, sw]`); empty = every language "
                             "of each task.")
    data_dir: Optional[str] = f(None, "Local copies of the datasets, `DIR/<task>/<language>/<split>.jsonl` (or "
                                "`.parquet`), relative to the recipe; unset = the hub when it is reachable.")
    job: Literal["none", "after_training", "every_step"] = f(
        "none", "Render `eval.sbatch` into the run folder and submit it after the training chain: `after_training` "
        "evaluates the last checkpoint, `every_step` every saved step (the job waits for the chain's last job "
        "to end and runs when training has finished).")
    gpus: Optional[int] = f(None, "GPUs of the evaluation job's one node (the model is spread over them with "
                            "lm-eval's HF backend, parallelize=True); unset = as few as hold the bf16 weights "
                            "with room for activations, at most cluster.gpus_per_node.", min=1)
    dtype: Literal["bfloat16", "float16", "float32"] = f("bfloat16", "Precision of the evaluated model on GPUs "
                                                         "(CPU evaluation always uses float32).")
    batch_size: int = f(16, "Requests per lm-eval batch.", min=1)
    time: str = f("02:00:00", "Wall-clock limit of the evaluation job, `[D-]HH:MM:SS`.")


@dataclass
class Eval:
    interval: int = f(125, "Evaluate every this many steps (`--eval-interval`).", min=1)
    iters: int = f(10, "Batches per evaluation (`--eval-iters`).", min=0)
    zero_shot: ZeroShot = f(factory=ZeroShot, doc="Zero-shot evaluation of saved checkpoints on held-out tasks "
                            "(`mtf-train eval`): XCOPA, XNLI, XStoryCloze, XWinograd by rank classification, as "
                            "BLOOMZ was judged.")


@dataclass
class Data:
    train_path: Optional[str] = f(None, "Weighted split-paths file for training (`--train-weighted-split-paths-path`), "
                                  "relative to the recipe's folder unless absolute.")
    valid_path: Optional[str] = f(None, "Weighted split-paths file for validation groups.")
    train_groups: Optional[str] = f(None, "Inline train groups in the path-file grammar, instead of train_path.")
    valid_groups: Optional[str] = f(None, "Inline validation groups in the path-file grammar, instead of valid_path.")
    root: Optional[str] = f(None, "Folder that relative dataset prefixes in the path files are rebased onto "
                            "(relative to the recipe's folder); unset = the path file's own folder.")
    tokenizer: str = f("bigscience/tokenizer", "Tokenizer: a local HF folder (relative to the recipe) or a hub name "
                       "resolved offline (`--tokenizer-name-or-path`).")
    tokenizer_type: Literal["PretrainedFromHF"] = f("PretrainedFromHF", "Tokenizer kind (`--tokenizer-type`).")
    dataloader_type: Literal["single", "cyclic"] = f("single", "Megatron data loader (`--dataloader-type`).")
    num_workers: int = f(2, "Data loader worker processes per rank.", min=0)


@dataclass
class Checkpoint:
    save: str = f("checkpoints", "Checkpoint folder (`--save`); relative paths live in the run folder.")
    load: Optional[str] = f(None, "Checkpoint to start from while `save` holds none yet (e.g. bloom's, converted to "
                            "universal); once `save` has one, every job resumes from `save` (`--load`).")
    interval: int = f(100, "Save every this many steps (`--save-interval`).", min=1)
    first_interval: Optional[int] = f(None, "Save interval for the first job of a run (bloomz used a tiny one so that "
                                      "the first-run flags below are dropped early).", min=1)
    from_scratch: bool = f(False, "Start from random weights. A recipe with first-run flags (a finetune) must name "
                           "`load` or set this, so that nobody finetunes random weights by mistake.")
    universal: bool = f(False, "First job only: load a universal checkpoint (`--universal-checkpoint`).")
    no_load_optim: bool = f(False, "First job only: do not load optimizer states (`--no-load-optim`).")
    reset_progress: bool = f(False, "First job only: reset iteration and consumed samples (`--reset-progress`).")


@dataclass
class Container:
    image: Optional[str] = f(None, "Container image for pyxis/enroot (`srun --container-image`).")
    mounts: list[str] = f(factory=list, doc="Container mounts, `SRC:DST` (`srun --container-mounts`).")
    workdir: Optional[str] = f(None, "Working directory inside the container (`--container-workdir`).")


@dataclass
class Cluster:
    nodes: int = f(1, "Nodes (`--nodes`).", min=1)
    accelerator: Literal["gpu", "cpu"] = f("gpu", "What each process runs on. cpu: gloo, fp32/bf16 only, no --gres.")
    gpus_per_node: int = f(1, "GPUs per node, or processes per node with accelerator cpu (`--gres=gpu:N`, `--nproc_per_node`).", min=1)
    partition: Optional[str] = f(None, "SLURM partition (`--partition`).")
    account: Optional[str] = f(None, "SLURM account (`--account`).")
    qos: Optional[str] = f(None, "SLURM quality of service (`--qos`).")
    constraint: Optional[str] = f(None, "SLURM node constraint (`--constraint`), e.g. a100.")
    time: str = f("01:00:00", "Wall-clock limit per job, `[D-]HH:MM:SS` (`--time`).")
    cpus_per_task: Optional[int] = f(None, "CPUs per launcher task (`--cpus-per-task`).", min=1)
    exclusive: bool = f(False, "Ask for whole nodes (`--exclusive`).")
    hint: Optional[str] = f(None, "SLURM `--hint`, e.g. nomultithread.")
    exclude: list[str] = f(factory=list, doc="Nodes to keep out of the job (`--exclude`), e.g. a slow one found by preflight.")
    extra_sbatch: list[str] = f(factory=list, doc="Extra `#SBATCH` lines, written as given (without the `#SBATCH `).")
    master_port: int = f(6001, "Rendezvous port on the first node (`MASTER_PORT`).", min=1)
    signal_margin_s: int = f(300, "SLURM sends USR1 to the batch shell this many seconds before the limit "
                             "(`--signal=B:USR1@N`); the job turns it into the kill switch.", min=0)
    save_margin_mins: int = f(10, "Minutes between the derived exit duration and the time limit.", min=0)
    tflops_per_gpu: float = f(150.0, "Assumed achieved TFLOP/s per GPU (hardware FLOPs) for the plan's time estimate.", gt=0)
    gpu_memory_gb: float = f(80.0, "Memory per GPU that the plan checks the peak estimate against.", gt=0)
    cuda_launch_blocking: bool = f(False, "Export `CUDA_LAUNCH_BLOCKING=1`: every kernel launch waits for the GPU "
                                   "(host launch time then adds to GPU time instead of overlapping it). The 2022 "
                                   "bigscience jobs set it as a workaround for a hang of their software stack "
                                   "(\"do not remove or the training will hang\"); turn it on only where a site "
                                   "meets such a hang.")


@dataclass
class Environment:
    env: dict[str, str] = f(factory=dict, doc="Environment variables exported by the job.")
    setup: list[str] = f(factory=list, doc="Shell lines run before launch (module loads, conda activation); "
                         "these are shell code and are not quoted.")
    container: Container = f(factory=Container, doc="Container (pyxis/enroot) for the launchers.")


@dataclass
class Runtime:
    kind: Literal["mtf_train", "megatron_deepspeed"] = f("mtf_train", "Trainer: the built-in `python -m mtf_train.train`, "
                                                         "or an external Megatron-DeepSpeed checkout.")
    megatron_deepspeed_dir: Optional[str] = f(None, "Megatron-DeepSpeed checkout (runtime megatron_deepspeed).")
    entrypoint: str = f("finetune_t0.py", "Script in the checkout that is launched (runtime megatron_deepspeed).")
    python: Optional[str] = f(None, "Python interpreter on the nodes; unset = the one running mtf-train (a shared "
                              "virtualenv), `python` = whatever the environment setup puts on PATH.")
    distributed_backend: Optional[Literal["nccl", "gloo"]] = f(None, "torch.distributed backend; nccl on GPUs, "
                                                                "gloo when unset and executor local without GPUs.")


@dataclass
class Logging:
    log_interval: int = f(1, "Log every this many steps (`--log-interval`).", min=1)
    tensorboard: bool = f(True, "Write TensorBoard events into the run's `tensorboard/` folder.")
    tensorboard_queue_size: int = f(5, "TensorBoard writer queue (`--tensorboard-queue-size`).", min=1)
    loss_curve: bool = f(True, "Draw `loss_curve.png` in the run folder at the end of each job (matplotlib, about "
                         "a second of CPU; false: `--no-loss-curve`).")


@dataclass
class Recipe:
    name: Optional[str] = f(None, "Run name; defaults to the recipe's file name.")
    executor: Literal["auto", "slurm", "submitit", "local"] = f(
        "auto", "How `mtf-train RECIPE` submits: sbatch, submitit, or this machine. auto = slurm when sbatch is on "
        "PATH or the recipe asks for more than one node, else local.")
    model: Model = f(factory=Model, doc="Model architecture.")
    parallel: Parallel = f(factory=Parallel, doc="Parallel shape.")
    batch: Batch = f(factory=Batch, doc="Batch sizes.")
    precision: Precision = f(factory=Precision, doc="Precision and ZeRO.")
    optimizer: Optimizer = f(factory=Optimizer, doc="Optimizer and learning-rate schedule.")
    training: Training = f(factory=Training, doc="Training length and loss.")
    eval: Eval = f(factory=Eval, doc="Evaluation: validation loss during training (`interval`, `iters`) and zero-shot evaluation of checkpoints (`zero_shot`).")
    data: Data = f(factory=Data, doc="Data: weighted split-path files and tokenizer.")
    checkpoint: Checkpoint = f(factory=Checkpoint, doc="Checkpoints.")
    cluster: Cluster = f(factory=Cluster, doc="Cluster allocation and planning assumptions.")
    environment: Environment = f(factory=Environment, doc="Job environment.")
    runtime: Runtime = f(factory=Runtime, doc="Which trainer runs.")
    logging: Logging = f(factory=Logging, doc="Logging.")


# YAML keys that are Python keywords.
YAML_KEY = {"global_": "global"}
FIELD_NAME = {v: k for k, v in YAML_KEY.items()}


def yaml_key(name: str) -> str:
    return YAML_KEY.get(name, name)


def schema_fields(cls: type) -> dict[str, Any]:
    """YAML key -> dataclass field, in declaration order."""
    return {yaml_key(fl.name): fl for fl in fields(cls)}
