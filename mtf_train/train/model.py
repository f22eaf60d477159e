"""BLOOM for multitask finetuning: megatron-core tensor-parallel layers, one layer list for both model forms.

`layer_specs(config)` is the single model definition, in Megatron-DeepSpeed's GPTModelPipe order
(L = num_layers):
    0      pipe_inputs          parameter-free: (tokens, segment_ids) in
    1      BloomEmbedding       tied "embed": word embeddings + embedding layer norm (+ hidden dropout)
    2      into_blocks          parameter-free
    3..L+2 BloomTransformerLayer
    L+3    drop_segment_ids     parameter-free: hidden states only from here on
    L+4    BloomFinalLayerNorm
    L+5    BloomEmbedding       tied "embed" again, as the LM head (`lm_head_inputs`): passes the hidden
                                states on; the loss (`loss.BloomLoss`) applies the head at target positions only
`BloomPipeline` hands the specs to DeepSpeed's PipelineModule; `BloomModel` (PP=1) builds the same specs the
way PipelineModule does, so both have the same parameter names and the same layer numbering in checkpoints.

Between layers the activations are the tuple `(hidden [b, s, h], segment_ids [b, s])`: DeepSpeed's pipeline
sends tuples of tensors between stages and only floating tensors get gradients, so the integer segment ids
(needed by every block's attention mask) simply travel along. The pipeline's batches are
`((tokens, segment_ids), (labels, loss_mask, segment_ids))`, see `loss.py`.

Class names matter for DeepSpeed's `partition_method="type:transformer|embedding"` (a case-insensitive regex
over spec class names / function names): blocks (`BloomTransformerLayer`) and both tied embedding specs
(`BloomEmbedding`) match, nothing else does, so 70 blocks + 2 embeddings give one unit per stage at PP=72.

Initialisation (Megatron style): weights ~ normal(0, init_std), the output layers of each block
(self_attention.dense, mlp.dense_4h_to_h) ~ normal(0, init_std / sqrt(2 * num_layers)), biases 0, layer norms
1/0. With `use_cpu_initialization` (the default) megatron-core draws each full weight on the CPU generator and
keeps this rank's shard; we seed that generator per layer (`init_seed + layer index`), so the initial weights
are identical for every TP/PP layout.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from deepspeed.checkpoint import constants as ds_constants
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from mtf_train.train import attention as attn
from mtf_train.train import hf_names
from mtf_train.train.loss import BloomLoss, head_token_losses
from mtf_train.train.parallel import ParallelState, pipe_topology


RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class BloomModelConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    padded_vocab_size: int
    original_vocab_size: int | None = None  # tokenizer size; rows beyond it are padding (universal ckpt)
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: torch.dtype = torch.float32
    checkpoint_activations: bool = False  # finetune_t0's flag: the same as recompute="full"
    recompute: str | None = None  # "none" | "selective" | "full"; None: from checkpoint_activations
    compile: bool = False  # torch.compile each block (one graph per block); see BloomTransformerLayer
    attention: str = "auto"  # "auto" | "reference" | "flex"
    init_seed: int = 1234
    perform_initialization: bool = True  # False: leave weights uninitialised (a checkpoint will be loaded)
    use_cpu_initialization: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.attention not in ("auto", "reference", "flex"):
            raise ValueError(f"attention must be auto, reference or flex, not {self.attention!r}")
        if self.original_vocab_size is not None and self.original_vocab_size > self.padded_vocab_size:
            raise ValueError("original_vocab_size exceeds padded_vocab_size")
        if self.recompute not in (None,) + RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, not {self.recompute!r}")

    @property
    def recompute_mode(self) -> str:
        if self.recompute is not None:
            return self.recompute
        return "full" if self.checkpoint_activations else "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "BloomModelConfig":
        """From a transformers `BloomConfig` (its vocab_size is the padded size)."""
        kwargs = {ours: getattr(hf_config, theirs) for ours, theirs in HF_CONFIG_NAMES.items()}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_kwargs(self) -> dict:
        """Arguments for transformers `BloomConfig(**kwargs)`."""
        return dict({theirs: getattr(self, ours) for ours, theirs in HF_CONFIG_NAMES.items()},
                    apply_residual_connection_post_layernorm=False)


# BloomModelConfig field -> transformers BloomConfig attribute, both ways.
HF_CONFIG_NAMES = {
    "num_layers": "n_layer", "hidden_size": "hidden_size", "num_heads": "n_head", "padded_vocab_size": "vocab_size",
    "layernorm_epsilon": "layer_norm_epsilon", "init_std": "initializer_range", "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
}


# --- helpers ------------------------------------------------------------------------------------------------


def _tp_size_rank() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _tp_group():
    # Passed explicitly to every megatron layer: implicit use of the global group is deprecated in mcore.
    return parallel_state.get_tensor_model_parallel_group()


def _megatron_config(config: BloomModelConfig) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=_tp_size_rank()[0],
        params_dtype=config.params_dtype,
        use_cpu_initialization=config.use_cpu_initialization,
        perform_initialization=config.perform_initialization,
    )


def _normal_init(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


@contextlib.contextmanager
def _layer_init_rng(config: BloomModelConfig, layer_index: int):
    """Draw this layer's initial weights from its own seed, leaving the global CPU generator untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed + layer_index)
        yield


def _drop_extra_state(module, state_dict, prefix, local_metadata):
    # megatron-core's linear layers save `<name>._extra_state: None`, which DeepSpeed's universal-checkpoint
    # converter cannot handle; their load pre-hook re-adds the key, so dropping it here loses nothing.
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("_extra_state")]:
        del state_dict[key]


def _mark_tensor_parallel(weight: torch.Tensor, dim: int) -> None:
    # megatron sets these attributes on weights only while initialising them; with perform_initialization
    # off they would be missing, and DeepSpeed's grad norm and ZeRO would treat the shard as replicated.
    if not hasattr(weight, "tensor_model_parallel"):
        tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _layer_norm(config: BloomModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)


def _tp_dropout_rng():
    """The model-parallel RNG stream (distinct per TP rank) for dropout on this rank's heads, as Megatron does.
    Without seeded tracker: the default generator at TP=1, an error at TP>1 (ranks would drop alike)."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if tracker.is_initialized() and "model-parallel-rng" in tracker.get_states():
        return tracker.fork
    if _tp_size_rank()[0] > 1:
        raise RuntimeError("attention dropout with tensor parallelism needs parallel.seed_everything() first")
    return None


def _rng_tracker_checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint: torch replays the default CPU/CUDA generators in the
    recomputation, but not the model-parallel tracker's states, so restore those too (else attention dropout
    would draw a different mask when recomputed)."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if not tracker.is_initialized():
        return contextlib.nullcontext(), contextlib.nullcontext()
    saved = tracker.get_states()

    @contextlib.contextmanager
    def recompute():
        current = tracker.get_states()
        tracker.set_states(dict(saved))
        try:
            yield
        finally:
            tracker.set_states(current)

    return contextlib.nullcontext(), recompute()


# --- tensor-parallel linear layers, compile-friendly ------------------------------------------------------
# megatron-core's ColumnParallelLinear/RowParallelLinear keep the weights (and their TP attributes, init and
# checkpoint names); their forward is done here instead. megatron's forward resolves the TP group on every call
# (`get_tensor_model_parallel_group_if_none`, which warns when RowParallelLinear passes None): under
# torch.compile each call is a graph break, 8 graphs per block. Here the group and size are fixed at
# construction, TP=1 is plain F.linear, and the TP collectives are functional ops Dynamo traces.


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group.group_name))


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient (megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward, identity backward (megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _column_parallel(layer, x: torch.Tensor, tp: int, group) -> torch.Tensor:
    """megatron's ColumnParallelLinear forward (gather_output=False, no sequence parallelism)."""
    if tp > 1:
        x = _CopyToTensorParallel.apply(x, group)
    return F.linear(x, layer.weight, layer.bias)


def _row_parallel(layer, x: torch.Tensor, tp: int, group) -> torch.Tensor:
    """megatron's RowParallelLinear forward (input_is_parallel=True, bias added after the reduction)."""
    out = F.linear(x, layer.weight)
    if tp > 1:
        out = _ReduceFromTensorParallel.apply(out, group)
    return out + layer.bias


# --- recomputation and compilation of a block -------------------------------------------------------------
# "full": the block keeps only its input and recomputes everything in backward (finetune_t0's
# --checkpoint-activations). "selective": selective activation checkpointing keeps the outputs of the GEMMs
# (the linear layers' mm/addmm, the tensor-parallel all-reduces and FlexAttention's fused kernel) and recomputes
# the rest: layer norms, GeLU (from its saved input) and, with the reference attention, the whole attention
# core (scores, softmax, probs @ V: the [b, heads, s, s] tensors). Recomputing costs no GEMM but the small
# attention batched matmuls; a block keeps 10 s*b*h-sized tensors instead of 16 and no s^2 one (plan.py).


def _selective_policy(ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    save = func in _SELECTIVE_SAVE or func is getattr(torch.ops.higher_order, "flex_attention", None)
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


_SELECTIVE_SAVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
    torch.ops._c10d_functional.all_reduce.default, torch.ops._c10d_functional.wait_tensor.default,
}


def _selective_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def _both_contexts(first, second):
    """Two (forward, recompute) context pairs entered together."""
    @contextlib.contextmanager
    def joined(a, b):
        with a, b:
            yield

    return joined(first[0], second[0]), joined(first[1], second[1])


def _replay_tracker_selective():
    return _both_contexts(_rng_tracker_checkpoint_contexts(), _selective_contexts())


def _block_forward(layer, hidden, segment_ids, impl, mask, slopes):
    """One block with its recompute mode: the function torch.compile turns into one graph per block. (With
    attention dropout the model-parallel RNG tracker's Python state breaks the graph; BLOOMZ trains without.)"""
    mode = layer.recompute
    if mode == "none" or not torch.is_grad_enabled():
        return layer._block(hidden, segment_ids, impl, mask, slopes)
    args = (layer._block, hidden, segment_ids, impl, mask, slopes)
    if layer._replay_tracker:  # attention dropout: the recomputation must replay the TP RNG tracker too
        context_fn = _replay_tracker_selective if mode == "selective" else _rng_tracker_checkpoint_contexts
        return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False, context_fn=context_fn)
    if mode == "selective":
        # Built here (not a module-level function) so that Dynamo sees a functools.partial it can trace.
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
        context_fn = partial(create_selective_checkpoint_contexts, _selective_policy)
        return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False, context_fn=context_fn)
    return torch.utils.checkpoint.checkpoint(*args, use_reentrant=False)


_compiled_block = None


def _compiled_block_forward():
    """`_block_forward` under torch.compile, one compiled function for every block of the process: the blocks
    differ only in their parameters, which Dynamo takes as graph inputs, so one graph serves them all."""
    global _compiled_block
    if _compiled_block is None:
        _compiled_block = torch.compile(_block_forward, dynamic=False)
    return _compiled_block


# --- layers -------------------------------------------------------------------------------------------------


class WordEmbeddingsWithNorm(tensor_parallel.VocabParallelEmbedding):
    """megatron's VocabParallelEmbedding with the embedding layer norm as its child `norm`, so the layer
    saves `word_embeddings.weight` and `word_embeddings.norm.{weight,bias}` like the bigscience fork."""

    def __init__(self, config: BloomModelConfig, mp_config: ModelParallelConfig):
        super().__init__(
            config.padded_vocab_size, config.hidden_size, init_method=_normal_init(config.init_std), config=mp_config,
            tp_group=_tp_group(),
        )
        _mark_tensor_parallel(self.weight, 0)
        self.norm = _layer_norm(config)

    def forward(self, input_ids):
        return self.norm(super().forward(input_ids))


class BloomEmbedding(nn.Module):
    """Word embeddings (vocab-parallel) + layer norm; the same module is the LM head (tied weights)."""

    def __init__(self, config: BloomModelConfig, layer_index: int = hf_names.EMBED_LAYER):
        super().__init__()
        with _layer_init_rng(config, layer_index):
            self.word_embeddings = WordEmbeddingsWithNorm(config, _megatron_config(config))
        self.hidden_dropout = config.hidden_dropout
        self.register_state_dict_post_hook(_drop_extra_state)

    def forward(self, inputs):
        tokens, segment_ids = inputs
        hidden = self.word_embeddings(tokens)
        hidden = F.dropout(hidden, self.hidden_dropout, self.training)
        return hidden, segment_ids

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocabulary shard of the logits, `[b, s, V/tp]` (logits for evaluation and tests;
        training goes through `lm_token_losses`, which never holds them all)."""
        # Identity forward; all-reduces the input gradient over TP ranks in backward.
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=_tp_group())
        return F.linear(hidden, self.word_embeddings.weight)

    def lm_token_losses(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        chunk_rows: int | None = None) -> torch.Tensor:
        """Per-token cross entropy `[b, s]` of the LM head at the positions where `loss_mask` is on (0
        elsewhere), chunked over those positions and over this rank's vocabulary shard (see `loss.py`)."""
        tp_group = _tp_group() if _tp_size_rank()[0] > 1 else None
        return head_token_losses(hidden, self.word_embeddings.weight, labels, loss_mask, tp_group, chunk_rows)


class BloomSelfAttention(nn.Module):
    def __init__(self, config: BloomModelConfig, mp_config, init_method, output_init_method):
        super().__init__()
        tp, rank = _tp_size_rank()
        if config.num_heads % tp:
            raise ValueError(f"num_heads {config.num_heads} is not divisible by tensor parallel size {tp}")
        self.num_local_heads = config.num_heads // tp
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.impl = config.attention
        # Output dim laid out [heads, 3, head_dim] (HF/bigscience BLOOM): dim-0 shards hold whole heads.
        self.query_key_value = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, config=mp_config, init_method=init_method,
            bias=True, gather_output=False, tp_group=_tp_group(),
        )
        self.dense = tensor_parallel.RowParallelLinear(
            config.hidden_size, config.hidden_size, config=mp_config, init_method=output_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=_tp_group(),
        )
        _mark_tensor_parallel(self.query_key_value.weight, 0)
        _mark_tensor_parallel(self.dense.weight, 1)
        self.tp, self.tp_group = tp, _tp_group()
        # Full-head-count slopes, this rank's heads. Kept off the module buffers: a bf16 cast must not touch them.
        first = rank * self.num_local_heads
        self._slopes_cpu = attn.alibi_slopes(config.num_heads)[first:first + self.num_local_heads]
        self._slopes_by_device: dict[torch.device, torch.Tensor] = {}

    def _slopes(self, device: torch.device) -> torch.Tensor:
        if device not in self._slopes_by_device:
            self._slopes_by_device[device] = self._slopes_cpu.to(device)
        return self._slopes_by_device[device]

    def forward(self, hidden: torch.Tensor, segment_ids: torch.Tensor, mask=None, impl: str | None = None,
                slopes: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`, `impl`, `slopes`: resolved by the block outside its compiled region (see `attention_inputs`)."""
        if impl is None:
            impl, mask, slopes = self.attention_inputs(hidden, segment_ids)
        b, s, _ = hidden.shape
        qkv = _column_parallel(self.query_key_value, hidden, self.tp, self.tp_group)
        qkv = qkv.view(b, s, self.num_local_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [b, heads, s, head_dim]
        dropout_active = self.training and self.attention_dropout > 0.0
        if impl == "flex":
            context = attn.flex_attention(q, k, v, segment_ids, slopes, block_mask=mask)
        else:
            context = attn.reference_attention(
                q, k, v, segment_ids, slopes, self.attention_dropout, self.training,
                dropout_rng=_tp_dropout_rng() if dropout_active else None, mask=mask,
            )
        context = context.transpose(1, 2).reshape(b, s, self.num_local_heads * self.head_dim)
        return _row_parallel(self.dense, context, self.tp, self.tp_group)

    def attention_inputs(self, hidden: torch.Tensor, segment_ids: torch.Tensor):
        """(impl, mask, slopes) for this micro batch: the mask comes from a per-micro-batch cache keyed on the
        segment-id tensor's identity and version, Python state that torch.compile would break on."""
        dropout_active = self.training and self.attention_dropout > 0.0
        impl = attn.resolve_impl(self.impl, hidden.device, dropout_active)
        return impl, attn.attention_mask(impl, segment_ids), self._slopes(hidden.device)


class BloomMLP(nn.Module):
    def __init__(self, config: BloomModelConfig, mp_config, init_method, output_init_method):
        super().__init__()
        self.dense_h_to_4h = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, 4 * config.hidden_size, config=mp_config, init_method=init_method,
            bias=True, gather_output=False, tp_group=_tp_group(),
        )
        self.dense_4h_to_h = tensor_parallel.RowParallelLinear(
            4 * config.hidden_size, config.hidden_size, config=mp_config, init_method=output_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=_tp_group(),
        )
        _mark_tensor_parallel(self.dense_h_to_4h.weight, 0)
        _mark_tensor_parallel(self.dense_4h_to_h.weight, 1)
        self.tp, self.tp_group = _tp_size_rank()[0], _tp_group()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = _column_parallel(self.dense_h_to_4h, hidden, self.tp, self.tp_group)
        hidden = F.gelu(hidden, approximate="tanh")  # BLOOM's (bias-)GeLU is the tanh approximation
        return _row_parallel(self.dense_4h_to_h, hidden, self.tp, self.tp_group)


class BloomTransformerLayer(nn.Module):
    """Pre-LN block: x + drop(attn(ln(x))), then + drop(mlp(ln(.))). `(hidden, segment_ids)` in and out."""

    def __init__(self, config: BloomModelConfig, layer_index: int):
        super().__init__()
        mp_config = _megatron_config(config)
        init = _normal_init(config.init_std)
        output_init = _normal_init(config.init_std / math.sqrt(2.0 * config.num_layers))
        with _layer_init_rng(config, layer_index):
            self.input_layernorm = _layer_norm(config)
            self.self_attention = BloomSelfAttention(config, mp_config, init, output_init)
            self.post_attention_layernorm = _layer_norm(config)
            self.mlp = BloomMLP(config, mp_config, init, output_init)
        self.hidden_dropout = config.hidden_dropout
        self.recompute = config.recompute_mode
        self.compile = config.compile
        # The model-parallel RNG tracker is used (and must be replayed by recomputation) only by attention dropout.
        self._replay_tracker = config.attention_dropout > 0.0
        self.register_state_dict_post_hook(_drop_extra_state)

    def _block(self, hidden, segment_ids, impl, mask, slopes):
        attn_out = self.self_attention(self.input_layernorm(hidden), segment_ids, mask, impl, slopes)
        hidden = hidden + F.dropout(attn_out, self.hidden_dropout, self.training)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + F.dropout(mlp_out, self.hidden_dropout, self.training)

    def forward(self, inputs):
        hidden, segment_ids = inputs
        impl, mask, slopes = self.self_attention.attention_inputs(hidden, segment_ids)
        run = _compiled_block_forward() if self.compile else _block_forward
        return run(self, hidden, segment_ids, impl, mask, slopes), segment_ids


class BloomFinalLayerNorm(nn.LayerNorm):
    """The layer norm after the last block (state `weight`, `bias`)."""

    def __init__(self, config: BloomModelConfig, layer_index: int | None = None):
        super().__init__(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)


# Parameter-free pipeline layers (plain functions: DeepSpeed saves no layer file for them).


def pipe_inputs(inputs):
    tokens, segment_ids = inputs
    return tokens, segment_ids


def into_blocks(inputs):
    return inputs


def drop_segment_ids(inputs):
    return inputs[0]


def lm_head_inputs(embedding: BloomEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    # The head's matmul runs inside the loss, at target positions only (`BloomLoss`); this spec still places
    # the tied embedding on the last stage, so DeepSpeed holds and synchronises its weight there.
    return hidden


# --- the model ----------------------------------------------------------------------------------------------


def layer_specs(config: BloomModelConfig) -> list:
    """DeepSpeed layer specs in GPTModelPipe order (see the module docstring), one per name of
    `hf_names.layer_spec_names`, whose index is the layer's file number."""
    tied = dict(tied_weight_attr=["word_embeddings.weight"])
    functions = {f.__name__: f for f in (pipe_inputs, into_blocks, drop_segment_ids)}
    layers = {c.__name__: c for c in (BloomTransformerLayer, BloomFinalLayerNorm)}
    head = hf_names.lm_head_layer(config.num_layers)
    specs = []
    for index, name in enumerate(hf_names.layer_spec_names(config.num_layers)):
        if name in functions:
            specs.append(functions[name])
        elif name == BloomEmbedding.__name__:  # the input embedding and, tied to it, the LM head
            head_fn = dict(forward_fn=lm_head_inputs) if index == head else {}
            specs.append(TiedLayerSpec("embed", BloomEmbedding, config, hf_names.EMBED_LAYER, **head_fn, **tied))
        else:
            specs.append(LayerSpec(layers[name], config, index))
    return specs


def universal_checkpoint_info(config: BloomModelConfig) -> dict:
    """DeepSpeed's `universal_checkpoint_info` for BLOOM (patterns are `re.match`ed against module parameter
    names, which the plain and the pipeline model share). Each pattern matches at least one parameter, as
    ds_to_universal's strict mode requires; `tests/test_train_model.py` checks them against `hf_names`."""
    C = ds_constants
    return {
        C.ORIGINAL_VOCAB_SIZE: config.original_vocab_size or config.padded_vocab_size,
        C.VOCABULARY_PARAMETER_PATTERNS: [r"tied_modules\.embed\.word_embeddings\.weight$"],
        # The last stage holds a copy of the tied embedding (only its weight is synchronised): use stage 0's.
        C.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules\.embed\."],
        C.PARAMETER_TO_AVERAGE_PATTERNS: [
            r"tied_modules\.embed\.word_embeddings\.norm\.(weight|bias)$",
            r"\d+\.(input_layernorm|post_attention_layernorm)\.(weight|bias)$",
            r"\d+\.self_attention\.dense\.bias$",
            r"\d+\.mlp\.dense_4h_to_h\.bias$",
            r"\d+\.(weight|bias)$",
        ],
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            r"\d+\.self_attention\.dense\.weight$",
            r"\d+\.mlp\.dense_4h_to_h\.weight$",
        ],
    }


class BloomModel(nn.Module):
    """The PP=1 model: the pipeline's layer specs built and run in sequence in one process.

    `model(tokens, segment_ids)` returns this TP rank's vocabulary shard of the logits `[b, s, V/tp]`;
    with `labels` and `loss_mask` it returns the scalar loss instead (without computing the full logits).
    """

    def __init__(self, config: BloomModelConfig, norm_target_loss: bool = True):
        super().__init__()
        self.config = config
        self.loss_fn = BloomLoss(norm_target_loss, self.lm_head)
        self.tied_modules = nn.ModuleDict()
        self._layers = []
        for index, spec in enumerate(layer_specs(config)):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self._layers.append(partial(spec.forward_fn, module) if spec.forward_fn else module)
            elif isinstance(spec, LayerSpec):
                module = spec.build()
                self.add_module(str(index), module)
                self._layers.append(module)
            else:
                self._layers.append(spec)
        self.universal_checkpoint_info = universal_checkpoint_info(config)

    def forward(self, tokens, segment_ids, labels=None, loss_mask=None):
        x = (tokens, segment_ids)
        for layer in self._layers:
            x = layer(x)
        if labels is None:
            return self.lm_head().lm_logits(x)
        return self.loss_fn(x, (labels, loss_mask, segment_ids))

    def lm_head(self) -> BloomEmbedding:
        return self.tied_modules["embed"]


class BloomPipeline(PipelineModule):
    """DeepSpeed PipelineModule over `layer_specs` with the BLOOM loss and universal-checkpoint info.

    Extra keyword arguments go to PipelineModule. Activation checkpointing is done by the blocks themselves
    (`config.checkpoint_activations`), so DeepSpeed's own interval stays 0.
    """

    def __init__(self, config: BloomModelConfig, topology, norm_target_loss: bool = True,
                 partition_method: str = "type:transformer|embedding", **kwargs):
        super().__init__(
            layers=layer_specs(config),
            topology=topology,
            loss_fn=BloomLoss(norm_target_loss, self.lm_head),
            partition_method=partition_method,
            activation_checkpoint_interval=0,
            **kwargs,
        )
        self.config = config
        self.universal_checkpoint_info = universal_checkpoint_info(config)

    def lm_head(self) -> BloomEmbedding:
        """The tied embedding, on the stages that hold it (the first and the last)."""
        return self.tied_modules["embed"]

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied Parameter itself with autograd on; torch then warns at every backward
        # that it differentiates through c10d::broadcast_ (deprecated, "may be silently incorrect").
        with torch.no_grad():
            super()._synchronize_tied_weights()


def build_model(config: BloomModelConfig, state: ParallelState, pipeline: bool | None = None,
                norm_target_loss: bool = True, **pipeline_kwargs):
    """`BloomModel` on `state.device` for PP=1 (unless `pipeline=True`), else `BloomPipeline`."""
    if pipeline is None:
        pipeline = state.pp > 1
    if pipeline:
        return BloomPipeline(config, pipe_topology(state), norm_target_loss=norm_target_loss, **pipeline_kwargs)
    if state.pp > 1:
        raise ValueError("the plain model needs pipeline parallel size 1")
    return BloomModel(config, norm_target_loss=norm_target_loss).to(state.device)


@torch.no_grad()
def gather_logits(vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards, without gradient (evaluation, tests). megatron's own gather
    allocates on `torch.cuda.current_device()`, so it cannot run on CPU."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return vocab_parallel_logits
    parts = [torch.empty_like(vocab_parallel_logits) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, vocab_parallel_logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=-1)


__all__ = [
    "BloomModelConfig", "BloomEmbedding", "BloomTransformerLayer", "BloomFinalLayerNorm", "BloomModel",
    "BloomPipeline", "build_model", "layer_specs", "universal_checkpoint_info", "gather_logits",
]
