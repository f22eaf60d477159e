"""What a checkpoint to convert is: its shapes, vocabulary and saved arguments, read from the layer files and
the client state alone (pickles only, no tensor data), and which target shapes it can take."""
from __future__ import annotations

from dataclasses import dataclass, field

from mtf_train import rules
from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.layout import Checkpoint
from mtf_train.ckpt.torchzip import TorchFile, load_small
from mtf_train.train import hf_names


@dataclass
class Source:
    ck: Checkpoint
    client: dict                    # mp_rank_00's full state (small), as saved
    state: "ClientState"            # the same, read (either form)
    args: dict
    num_layers: int
    hidden_size: int
    num_heads: int
    padded_vocab: int
    original_vocab: int
    dtype: str                      # "float32" | "bfloat16" | "float16": what the model computes in
    full_shapes: dict = field(default_factory=dict)   # module name -> full (TP-merged) shape
    layer_keys: dict = field(default_factory=dict)    # layer -> [keys] in file order

    @property
    def partition_method(self) -> str:
        return self.args.get("pp_partition_method") or "type:transformer|embedding"

    def model_spec(self, padded_vocab: int | None = None) -> dict:
        a = self.args
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                    padded_vocab_size=padded_vocab or self.padded_vocab, original_vocab_size=self.original_vocab,
                    layernorm_epsilon=a.get("layernorm_epsilon", 1e-5), init_std=a.get("init_method_std", 0.02))


def read_source(folder, step: int | None = None, torch_free: bool = False) -> Source:
    """The step, verified (`client.read_checkpoint`) and described. `torch_free`: without importing torch, for
    the input checks (the client state's tensors stay unread; `torchzip.NeedsTorch` when a file needs torch)."""
    from mtf_train.ckpt.client import read_checkpoint

    ck, state = read_checkpoint(folder, step, torch_free=torch_free)
    client = state.raw if torch_free else load_small(ck.mp_files[0])  # the file as read, tensors unread
    args = state.args
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not isinstance(args.get(k), int)]
    if missing:
        raise CkptError(str(ck.mp_files[0]), f"the saved args lack {', '.join(missing)}")
    L = args["num_layers"]
    # Shapes from the layer files (every layer at every tensor rank; only the pickles are read).
    shapes: dict[str, list] = {}
    layer_keys: dict[int, list] = {}
    for (layer, tp_rank), path in sorted(ck.layer_files.items()):
        with TorchFile(path) as tf:
            sd = tf.load(torch_free=torch_free)
        if not isinstance(sd, dict):
            raise CkptError(str(path), "not a layer state dict")
        if tp_rank == 0:
            layer_keys[layer] = list(sd)
        for key, t in sd.items():
            shapes.setdefault(hf_names.layer_key_to_module_name(layer, key, L), []).append(tuple(t.shape))
    full = {}
    for name, per_tp in shapes.items():
        dim = hf_names.tp_partition_dim(name)
        shape = list(per_tp[0])
        if dim is not None:
            shape[dim] = sum(s[dim] for s in per_tp)
        full[name] = tuple(shape)
    expected = set(hf_names.expected_module_names(L))
    if set(full) != expected:
        odd = sorted(set(full) ^ expected)[:3]
        raise CkptError(str(ck.path), f"not a BLOOM checkpoint of {L} layers (unexpected or missing: {odd})")
    padded = full[hf_names.TIED_PREFIX + "word_embeddings.weight"][0]
    original = state.original_vocab_size or padded
    ds_cfg = client.get("ds_config") or {}
    dtype = ("bfloat16" if (ds_cfg.get("bf16") or {}).get("enabled") or args.get("bf16") else
             "float16" if (ds_cfg.get("fp16") or {}).get("enabled") or args.get("fp16") else "float32")
    return Source(ck=ck, client=client, state=state, args=args, num_layers=L, hidden_size=args["hidden_size"],
                  num_heads=args["num_attention_heads"], padded_vocab=padded, original_vocab=int(original),
                  dtype=dtype, full_shapes=full, layer_keys=layer_keys)


def target_padded_vocab(src: Source, tp: int) -> int:
    """What the trainer computes at TP `tp` (rules.padded_vocab), from the saved args."""
    a = src.args
    pad_to = int(a["pad_vocab_size_to"]) if a.get("pad_vocab_size_to") else None
    if pad_to is None and (src.original_vocab == src.padded_vocab or not a.get("make_vocab_size_divisible_by")):
        padded = src.padded_vocab  # no tokenizer size known: keep the rows as they are
    else:
        padded = rules.padded_vocab(src.original_vocab, tp, int(a.get("make_vocab_size_divisible_by") or 1), pad_to)
    if padded % tp:
        raise CkptError("--tp", f"the padded vocabulary ({padded}) does not split over {tp} tensor ranks")
    return padded


def check_shape(src: Source, tp: int, pp: int, dp: int) -> None:
    for name, v in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if v < 1:
            raise CkptError(name, f"must be at least 1, not {v}")
    if src.num_heads % tp:
        raise CkptError("--tp", f"{src.num_heads} attention heads are not divisible by tensor parallel size {tp}")
    for name, shape in src.full_shapes.items():
        dim = hf_names.tp_partition_dim(name)
        if dim is not None and "word_embeddings" not in name and shape[dim] % tp:
            raise CkptError("--tp", f"{name} ({shape[dim]} on dim {dim}) does not split over {tp} tensor ranks")
    units = rules.partition_units(src.num_layers, src.partition_method)
    if pp > units:
        raise CkptError("--pp", f"{pp} pipeline stages exceed the {units} units partitioned by "
                        f"{src.partition_method!r}")

