"""Names and tensor-parallel layout of BLOOM parameters, shared by the model and the checkpoint tools.

Three naming schemes meet here (L = number of transformer blocks):
- module names, identical for the plain model and the DeepSpeed PipelineModule (the plain model mirrors it):
  `tied_modules.embed.word_embeddings.weight`, `tied_modules.embed.word_embeddings.norm.{weight,bias}`,
  `{3+i}.<block key>` for block i, `{L+4}.{weight,bias}` for the final layer norm;
- layer files of a DeepSpeed pipeline checkpoint: (layer index, key) with index 1 for the tied embedding,
  3..L+2 for blocks, L+4 for the final layer norm (the bigscience Megatron-DeepSpeed layout); the last layer, L+5, re-uses the
  tied embedding and is not saved separately by the bigscience tools;
- HF transformers BLOOM: `word_embeddings.weight`, `word_embeddings_layernorm.*`, `h.{i}.*`, `ln_f.*`
  (with a `transformer.` prefix inside `BloomForCausalLM`, whose `lm_head.weight` is the tied embedding).

Tensor-parallel rules (those of bigscience's universal-checkpoint conversion): layer norms and the biases of the row-parallel layers
(`self_attention.dense.bias`, `mlp.dense_4h_to_h.bias`) are replicated (averaged when merging);
`self_attention.dense.weight` and `mlp.dense_4h_to_h.weight` are split on dim 1; everything else on dim 0
(the fused QKV is [heads, 3, head_dim] on its output dim, so contiguous dim-0 shards are whole heads; the
word embeddings' dim 0 is the padded vocabulary).
"""
from __future__ import annotations

import re

EMBED_LAYER = 1
FIRST_BLOCK_LAYER = 3
TIED_PREFIX = "tied_modules.embed."

_BLOCK_KEYS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "self_attention.dense.weight",
    "self_attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)
_EMBED_KEYS = ("word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias")

_REPLICATED_KEY = re.compile(
    r"^(weight|bias"
    r"|word_embeddings\.norm\.(weight|bias)"
    r"|(input_layernorm|post_attention_layernorm)\.(weight|bias)"
    r"|self_attention\.dense\.bias|mlp\.dense_4h_to_h\.bias)$"
)
_ROW_PARALLEL_KEY = re.compile(r"^(self_attention\.dense|mlp\.dense_4h_to_h)\.weight$")


def final_norm_layer(num_layers: int) -> int:
    return num_layers + 4


def lm_head_layer(num_layers: int) -> int:
    return num_layers + 5


# --- module names <-> layer files ---------------------------------------------------------------------------


def module_name_to_layer_key(name: str) -> tuple[int, str]:
    """`tied_modules.embed.X` -> (1, X); `N.X` -> (N, X)."""
    if name.startswith(TIED_PREFIX):
        return EMBED_LAYER, name[len(TIED_PREFIX):]
    index, _, key = name.partition(".")
    if not index.isdigit() or not key:
        raise KeyError(f"not a BLOOM module parameter name: {name!r}")
    return int(index), key


def layer_key_to_module_name(layer: int, key: str, num_layers: int) -> str:
    if layer in (EMBED_LAYER, lm_head_layer(num_layers)):
        return TIED_PREFIX + key
    return f"{layer}.{key}"


def expected_module_names(num_layers: int) -> list[str]:
    """Every parameter name of a full model, in layer order."""
    names = [TIED_PREFIX + k for k in _EMBED_KEYS]
    for i in range(num_layers):
        names += [f"{FIRST_BLOCK_LAYER + i}.{k}" for k in _BLOCK_KEYS]
    names += [f"{final_norm_layer(num_layers)}.weight", f"{final_norm_layer(num_layers)}.bias"]
    return names


# --- ours <-> HF transformers -------------------------------------------------------------------------------


def to_hf_name(name: str, num_layers: int) -> str:
    layer, key = module_name_to_layer_key(name)
    if layer == EMBED_LAYER:
        return key.replace("word_embeddings.norm.", "word_embeddings_layernorm.")
    if FIRST_BLOCK_LAYER <= layer < FIRST_BLOCK_LAYER + num_layers:
        return f"h.{layer - FIRST_BLOCK_LAYER}.{key}"
    if layer == final_norm_layer(num_layers) and key in ("weight", "bias"):
        return f"ln_f.{key}"
    raise KeyError(f"no HF name for {name!r}")


def from_hf_name(name: str, num_layers: int) -> str | None:
    """HF name (with or without `transformer.`) -> our module name; None for `lm_head.weight` (tied)."""
    if name == "lm_head.weight":
        return None
    name = name.removeprefix("transformer.")
    if name.startswith("word_embeddings_layernorm."):
        return TIED_PREFIX + "word_embeddings.norm." + name[len("word_embeddings_layernorm."):]
    if name == "word_embeddings.weight":
        return TIED_PREFIX + name
    if name.startswith("ln_f."):
        return f"{final_norm_layer(num_layers)}.{name[len('ln_f.'):]}"
    m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
    if m and int(m.group(1)) < num_layers:
        return f"{FIRST_BLOCK_LAYER + int(m.group(1))}.{m.group(2)}"
    raise KeyError(f"unknown HF BLOOM parameter {name!r}")


def to_hf_state_dict(state_dict: dict, num_layers: int, prefix: str = "") -> dict:
    """Our (TP-merged) module state dict -> HF names; `prefix="transformer."` for `BloomForCausalLM`, which
    then also gets `lm_head.weight` (the tied embedding)."""
    out = {prefix + to_hf_name(k, num_layers): v for k, v in state_dict.items()}
    if prefix:
        out["lm_head.weight"] = out[prefix + "word_embeddings.weight"]
    return out


def from_hf_state_dict(state_dict: dict, num_layers: int) -> dict:
    out = {}
    for k, v in state_dict.items():
        ours = from_hf_name(k, num_layers)
        if ours is not None:
            out[ours] = v
    return out


# --- tensor-parallel split / merge --------------------------------------------------------------------------


def tp_partition_dim(name: str) -> int | None:
    """None for replicated parameters, else the dim sharded over TP ranks (module name or layer key)."""
    key = module_name_to_layer_key(name)[1] if (name.startswith(TIED_PREFIX) or name[:1].isdigit()) else name
    if _REPLICATED_KEY.match(key):
        return None
    return 1 if _ROW_PARALLEL_KEY.match(key) else 0


def split_tensor(name: str, tensor: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """The part of one full parameter (or optimizer state) that TP rank `tp_rank` of `tp` holds: a view."""
    import torch  # here, not at the top: the checkpoint tools read names without loading torch

    dim = tp_partition_dim(name)
    if dim is None:
        return tensor
    if tensor.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of size {tensor.shape[dim]} does not split over {tp} ranks")
    return torch.chunk(tensor, tp, dim=dim)[tp_rank]


def merge_tensor(name: str, parts: list) -> torch.Tensor:
    """Inverse of `split_tensor`: average replicated parameters, concatenate the others (one part: itself)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    dim = tp_partition_dim(name)
    return torch.stack(parts).mean(0) if dim is None else torch.cat(parts, dim=dim)


def split_tp(state_dict: dict, tp: int, tp_rank: int) -> dict:
    """The shard of a full (TP=1) state dict that TP rank `tp_rank` of `tp` holds (copies)."""
    return {name: split_tensor(name, tensor, tp, tp_rank).clone() for name, tensor in state_dict.items()}


def merge_tp(shards: list[dict]) -> dict:
    """Inverse of `split_tp`: the full state dict from every TP rank's shard."""
    return {name: merge_tensor(name, [s[name] for s in shards]) for name in shards[0]}


# --- pipeline layer specs ---------------------------------------------------------------------------------------


def layer_spec_names(num_layers: int) -> list[str]:
    """The class / function names of `model.layer_specs`, in order: what DeepSpeed's `type:` partitioning matches.
    The model builds its specs from this list, and the checkpoint tools partition stages with it without
    importing the model (megatron-core costs seconds). Index = layer file number (EMBED_LAYER, FIRST_BLOCK_LAYER...)."""
    return (["pipe_inputs", "BloomEmbedding", "into_blocks"] + ["BloomTransformerLayer"] * num_layers
            + ["drop_segment_ids", "BloomFinalLayerNorm", "BloomEmbedding"])
