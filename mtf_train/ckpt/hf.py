"""`mtf-train ckpt export-hf` and `import-hf`: our layout <-> a transformers BloomForCausalLM folder.

Export streams: each parameter's tensor-parallel shards are read from the layer files, merged with BLOOM's
rules (`hf_names.merge_tensor`), renamed (`hf_names.to_hf_name`) and added to the current safetensors shard, which
is written once it reaches `--shard-size` (memory: one shard plus one parameter). The vocabulary keeps its
padded size, as BLOOM's own HF config does (250880 rows for a 250680-token tokenizer), so `vocab_size` is the
padded size and the logits of the padding rows are kept too. `config.json` has BLOOM's special token ids
(unk 0, bos 1, eos 2, pad 3); the tokenizer files are copied when the checkpoint's args name a local tokenizer
folder. Verification: our model at the checkpoint's shape and transformers' `AutoModelForCausalLM` loaded from
the new folder (offline) give the same logits on a fixed row.

Import runs the real model at the target shape (`worker import`): each rank copies its shards of the HF
weights into the model, DeepSpeed saves iteration 0 with a fresh optimizer, the saved checkpoint is loaded
back and its logits compared with transformers'. A run then starts from it with `checkpoint.load: DIR`.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from mtf_train.ckpt.errors import CkptError, VerifyError
from mtf_train.ckpt.layout import human, staged
from mtf_train.ckpt.torchzip import TorchFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
SPECIAL_IDS = dict(unk_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise CkptError("--shard-size", f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


def hf_logits(hf_dir: Path, ids, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or torch.float32,
                                                     local_files_only=True)
    except TypeError:  # older transformers: torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=dtype or torch.float32,
                                                     local_files_only=True)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    return out, type(model).__name__


# --- export --------------------------------------------------------------------------------------------------


def export_hf(folder, output, *, step: int | None = None, dtype: str | None = None, shard_size: str = "5GB",
              verify: bool = True) -> dict:
    """Write DIR's step as a transformers folder at `output`; returns what was done (the `--json` object)."""
    from mtf_train.ckpt.source import read_source
    from mtf_train.train import hf_names

    out = Path(output).resolve()
    src = read_source(folder, step)  # checked before torch is imported: a missing folder is refused at once
    import torch
    from safetensors.torch import save_file

    ck = src.ck
    limit = parse_size(shard_size)
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "")
    L = src.num_layers
    t0 = time.perf_counter()
    with staged(out) as tmp:
        files, shard, shard_bytes, index, total = [], {}, 0, {}, 0
        saved_dtype = None

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"part-{len(files):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                files.append((name, list(shard)))
                shard, shard_bytes = {}, 0

        opened = {key: TorchFile(p) for key, p in ck.layer_files.items()}
        try:
            lazies = {key: tf.load() for key, tf in opened.items()}
            for name in hf_names.expected_module_names(L):
                layer, key = hf_names.module_name_to_layer_key(name)
                parts = [lazies[(layer, t)][key].load() for t in range(ck.tp)]
                full = hf_names.merge_tensor(name, parts)
                saved_dtype = saved_dtype or full.dtype
                if cast is not None:
                    full = full.to(cast)
                hf = "transformer." + hf_names.to_hf_name(name, L)
                nbytes = full.numel() * full.element_size()
                if shard and shard_bytes + nbytes > limit:
                    flush()
                shard[hf] = full.contiguous()
                shard_bytes += nbytes
                total += nbytes
            flush()
        finally:
            for tf in opened.values():
                tf.close()
        if len(files) == 1:
            (tmp / files[0][0]).rename(tmp / "model.safetensors")
        else:
            n = len(files)
            for i, (name, keys) in enumerate(files):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (tmp / name).rename(tmp / final)
                index.update({k: final for k in keys})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        _umask_modes(tmp)  # safetensors writes 0600 files: give them the modes every other file gets
        out_dtype = cast or saved_dtype or torch.float32
        write_config(tmp, src, out_dtype)
        tok_note = copy_tokenizer(src.args.get("tokenizer_name_or_path"), tmp)
        took = time.perf_counter() - t0
        print(f"exported {ck.path} (tp {ck.tp} x pp {ck.pp}, iteration {src.client.get('iteration')}) -> {out}: "
              f"{human(total)} in {len(files)} safetensors file(s), {str(out_dtype).replace('torch.', '')}, "
              f"vocab {src.padded_vocab} (tokenizer {src.original_vocab}); {tok_note} ({took:.1f} s)", flush=True)
        checks, not_verified = [], None
        if verify:
            from mtf_train.ckpt.verify import estimate_fits

            fits, why = estimate_fits(src, ck.tp, ck.pp, 1)
            if fits:
                checks = [verify_export(src, tmp, out_dtype)]
            else:
                not_verified = why
                print(f"  not verified here: {why} (compare on a larger machine with export-hf there)")
    print(f"done: {out}")
    return {"input": str(ck.path), "output": str(out), "iteration": src.client.get("iteration"),
            "dtype": str(out_dtype).replace("torch.", ""), "files": len(files), "bytes": total,
            "checks": checks, "not_verified": not_verified}


def _umask_modes(folder: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in folder.glob("*.safetensors"):
        p.chmod(0o666 & ~umask)


def write_config(folder: Path, src, dtype) -> None:
    from transformers import BloomConfig

    a = src.args
    cfg = BloomConfig(vocab_size=src.padded_vocab, hidden_size=src.hidden_size, n_layer=src.num_layers,
                      n_head=src.num_heads, layer_norm_epsilon=a.get("layernorm_epsilon", 1e-5),
                      initializer_range=a.get("init_method_std", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
                      apply_residual_connection_post_layernorm=False, pretraining_tp=1, slow_but_exact=False,
                      tie_word_embeddings=True, architectures=["BloomForCausalLM"], **SPECIAL_IDS)
    cfg.dtype = str(dtype).replace("torch.", "")
    cfg.save_pretrained(str(folder))


def copy_tokenizer(path, dest: Path) -> str:
    if not path:
        return "no tokenizer named in the checkpoint"
    p = Path(path)
    if not p.is_dir():
        return f"tokenizer {path} is not a local folder: not copied"
    copied = [f for f in TOKENIZER_FILES if (p / f).is_file()]
    for f in copied:
        shutil.copy2(p / f, dest / f)
    return f"tokenizer copied from {p}" if copied else f"no tokenizer files in {p}"


def check_hf_logits(hf_dir: Path, batch: tuple, ours, vocab: int, tol: float, *, relative_to_ours: bool, line: str,
                    where: str, failure: str, scratch: Path) -> dict:
    """transformers' logits on the fixed batch (seq, vocab, seed) against ours over the first `vocab` columns;
    prints `line` (its {cls}: the transformers class) with the result and returns the check (named
    "transformers logits"); raises VerifyError when out of `tol`."""
    from mtf_train.ckpt.verify import check, check_status, fixed_batch, logits_diff

    ids, _, _ = fixed_batch(1, *batch, single_segment=True)
    theirs, cls = hf_logits(hf_dir, ids[:, :-1])
    diff = logits_diff(theirs, ours, vocab) if relative_to_ours else logits_diff(ours, theirs, vocab)
    c = dict(check("transformers logits", diff, tol), transformers_class=cls)
    print(line.format(cls=cls) + check_status(c))
    if not c["ok"]:
        raise VerifyError(where, f"verification failed: {failure} differ by {diff:.2e} (tolerance {tol:.0e}); "
                          f"logs in {scratch}")
    return c


def verify_export(src, hf_dir: Path, dtype) -> dict:
    import torch

    from mtf_train.ckpt.verify import TOLERANCE, run_worker, verify_spec

    ck = src.ck
    scratch = Path(tempfile.mkdtemp(prefix="mtf-ckpt-"))
    spec = verify_spec(src, "probe", ck.root, ck.tag, ck.tp, ck.pp, 1, rows=1, padded=src.padded_vocab,
                       steps=False, load_module_only=True)
    spec["batch"]["single_segment"] = True
    ours = run_worker(spec, scratch, label="ours")
    b = spec["batch"]
    tol = TOLERANCE["float32" if dtype == torch.float32 and src.dtype == "float32" else "bfloat16"][1]
    c = check_hf_logits(hf_dir, (b["seq"], b["vocab"], b["seed"]), ours["logits0"], src.padded_vocab, tol,
                        relative_to_ours=True,
                        line=f"  transformers {{cls}} loads it; logits vs ours at tp {ck.tp} x pp {ck.pp}: ",
                        where=str(hf_dir), failure="transformers' logits", scratch=scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return c


# --- import --------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise CkptError(str(hf_dir), "no such folder")
    path = hf_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CkptError(str(hf_dir), "no config.json: not a transformers model folder") from None
    except (OSError, ValueError) as err:
        raise CkptError(str(path), f"unreadable ({err})") from None
    if cfg.get("model_type") != "bloom":
        raise CkptError(str(path), f"model_type {cfg.get('model_type')!r}: only BLOOM is supported")
    for k in ("n_layer", "hidden_size", "n_head", "vocab_size"):
        if k not in cfg and not (k == "n_layer" and "num_hidden_layers" in cfg):
            raise CkptError(str(path), f"missing {k}")
    if not list(hf_dir.glob("*.safetensors")):
        raise CkptError(str(hf_dir), "no .safetensors weights")
    for f in hf_dir.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # safetensors raises its own error types
            raise CkptError(str(f), f"truncated or corrupt ({str(err).splitlines()[0][:120]})") from None
    return cfg


def tokenizer_size(hf_dir: Path) -> int | None:
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def import_hf(hf_dir, output, *, tp: int = 1, pp: int = 1, dp: int = 1, dtype: str = "float32",
              verify: bool = True) -> dict:
    """Split a transformers BLOOM folder into our layout at `output`; returns what was done (the `--json` object)."""
    from mtf_train.ckpt.layout import check_output
    from mtf_train.ckpt.verify import TOLERANCE, run_worker
    from mtf_train.train.args import build_parser, check

    hf_dir = Path(hf_dir).resolve()
    out = Path(output).resolve()
    cfg = read_hf_config(hf_dir)
    L = cfg.get("n_layer", cfg.get("num_hidden_layers"))
    h, heads, vocab = cfg["hidden_size"], cfg["n_head"], cfg["vocab_size"]
    for name, v in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if v < 1:
            raise CkptError(name, f"must be at least 1, not {v}")
    if heads % tp:
        raise CkptError("--tp", f"{heads} attention heads are not divisible by tensor parallel size {tp}")
    if vocab % tp:
        raise CkptError("--tp", f"the vocabulary ({vocab}) does not split over {tp} tensor ranks")
    if pp > L + 2:
        raise CkptError("--pp", f"{pp} pipeline stages exceed the {L + 2} units (blocks and embeddings)")
    check_output(out)
    original = tokenizer_size(hf_dir) or vocab
    if original > vocab:
        raise CkptError(str(hf_dir), f"the tokenizer has {original} tokens, the model only {vocab} rows")
    argv = ["--num-layers", str(L), "--hidden-size", str(h), "--num-attention-heads", str(heads),
            "--seq-length", "2048", "--micro-batch-size", "1", "--global-batch-size", str(dp), "--train-iters", "1",
            "--lr", "1e-5", "--tokenizer-name-or-path", str(hf_dir), "--pad-vocab-size-to", str(vocab),
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--train-weighted-split-paths-path", "unset", "--save", str(out), "--save-interval", "1",
            "--load", str(out), "--layernorm-epsilon", repr(float(cfg.get("layer_norm_epsilon", 1e-5))),
            "--init-method-std", repr(float(cfg.get("initializer_range", 0.02))), "--embed-layernorm",
            "--deepspeed", "--zero-stage", "1"]
    if dtype == "bfloat16":
        argv.append("--bf16")
    args = vars(check(build_parser().parse_args(argv)))
    client = {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": {}, "args": args,
              "padded_vocab_size": vocab, "original_vocab_size": original}
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": dp, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 1}}
    if dtype == "bfloat16":
        ds_cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    seq = 64
    spec = dict(mode="import", load=None, tag="global_step0", save_tag="global_step0", tp=tp, pp=pp, dp=dp,
                hf_dir=str(hf_dir), model=dict(num_layers=L, hidden_size=h, num_heads=heads, padded_vocab_size=vocab,
                                               original_vocab_size=original,
                                               layernorm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
                                               init_std=cfg.get("initializer_range", 0.02)),
                norm_target_loss=False, partition_method="type:transformer|embedding", seed=1234, ds_config=ds_cfg,
                optimizer=dict(lr=1e-5, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8), step_lr=1e-5,
                batch=dict(rows=dp, seq=seq, vocab=original, seed=1234, single_segment=True), steps=False)
    t0 = time.perf_counter()
    print(f"import {hf_dir} ({L} layers, hidden {h}, {heads} heads, vocab {vocab}) -> {out} "
          f"(tp {tp} x pp {pp} x dp {dp}, {dtype})", flush=True)
    import torch  # after every check of the input: a bad one is refused before torch loads

    scratch = Path(tempfile.mkdtemp(prefix="mtf-ckpt-"))
    with staged(out) as tmp:
        torch.save(client, scratch / "client.pt")
        spec.update(save=str(tmp), client=str(scratch / "client.pt"))
        ours = run_worker(spec, scratch, label="import")
        print(f"saved iteration 0 at tp {tp} x pp {pp} x dp {dp} ({time.perf_counter() - t0:.1f} s)", flush=True)
        checks = []
        if verify:
            tol = TOLERANCE[dtype if dtype != "float32" else "float32"][1]
            checks = [check_hf_logits(
                hf_dir, (seq, original, 1234), ours["logits0"], vocab, tol, relative_to_ours=False,
                line=f"  logits at tp {tp} x pp {pp} after reloading vs transformers' {{cls}}: ",
                where=str(out), failure="logits", scratch=scratch)]
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"done: {out}; start a run from it with checkpoint.load={out} (model.pad_vocab_size_to: {vocab})")
    return {"input": str(hf_dir), "output": str(out), "tp": tp, "pp": pp, "dp": dp, "dtype": dtype,
            "padded_vocab_size": vocab, "checks": checks}
