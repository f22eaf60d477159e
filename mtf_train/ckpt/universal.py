"""`mtf-train ckpt to-universal DIR`: DeepSpeed's universal converter, used as a library.

`deepspeed.checkpoint.ds_to_universal.main` does the work (extract ZeRO fragments, merge tensor-parallel
slices, copy the client state). Around it:
- BLOOM's tensor-parallel patterns are supplied when the checkpoint lacks `universal_checkpoint_info` (2022
  Megatron-DeepSpeed checkpoints do): the converter's own `--inject_missing_state` hook is pointed at
  `model.universal_checkpoint_info`, and the copied client-state files get the same info;
- worker counts follow this host's memory (an extract worker holds one optimizer shard, a merge worker the
  slices of one parameter) and CPUs; DeepSpeed's tqdm bar shows progress on stderr, its chatter goes there too;
- the result is written into a scratch folder and renamed into place, then `latest_universal` is replaced
  atomically, so an interrupted conversion leaves nothing behind; the input step is never modified.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from argparse import Namespace
from pathlib import Path

from mtf_train.ckpt.errors import CkptError
from mtf_train.ckpt.layout import Checkpoint, human, mem_available
from mtf_train.files import atomic_path, write_atomic


def bloom_info(state) -> dict:
    from types import SimpleNamespace

    from mtf_train.train.model import universal_checkpoint_info

    padded = state.padded_vocab_size
    original = state.original_vocab_size or padded
    return universal_checkpoint_info(SimpleNamespace(original_vocab_size=original, padded_vocab_size=padded))


def worker_counts(ck: Checkpoint, workers: int | None, merge_workers: int | None) -> tuple[int, int]:
    """Extract workers each load one optimizer shard (about 1.5x its file); merge workers hold the TP slices of
    one parameter's three states (about 4x its fp32 size). Leave a fifth of the memory free."""
    from mtf_train.ckpt.torchzip import TorchFile

    budget = mem_available() * 0.8
    cpus = os.cpu_count() or 1
    largest_file = max(p.stat().st_size for p in ck.optim_files.values())
    largest_param = 0
    with TorchFile(ck.mp_files[0]) as tf:
        shapes = tf.load().get("param_shapes") or []
    for group in shapes:
        for shape in group.values():
            n = 1
            for s in shape:
                n *= s
            largest_param = max(largest_param, n * 4 * ck.tp)
    small = sum(p.stat().st_size for p in ck.optim_files.values()) < (256 << 20)
    if workers is None:  # processes cost a fork and a pickled checkpoint each: not worth it for small ones
        workers = 1 if small else max(1, min(cpus, len(ck.optim_files), int(budget // max(1, 1.5 * largest_file))))
    if merge_workers is None:
        merge_workers = 1 if small else max(1, min(cpus, int(budget // max(1, 4 * largest_param))))
    return workers, merge_workers


def to_universal(folder, *, step: int | None = None, output_root=None, workers: int | None = None,
                 merge_workers: int | None = None, force: bool = False, quiet: bool = False,
                 keep_vocab_padding: bool = False) -> Path:
    """Convert; returns the `global_stepN_universal` folder. `keep_vocab_padding` keeps the vocabulary's
    padding rows (trained weights and states) instead of DeepSpeed's default of dropping them, for a load at
    a shape with the same padded size: the reload is then exact."""
    from mtf_train.ckpt.client import ClientState, read_checkpoint
    from mtf_train.ckpt.torchzip import load_small
    from mtf_train.ckpt.safe import guard_torch_load
    from mtf_train.ckpt.safe import load as safe_load

    # every file checked before DeepSpeed reads any (its own errors on a damaged file are long and come after
    # partial output), and before DeepSpeed is imported: a missing folder is refused at once
    ck, state = read_checkpoint(folder, step)
    if not ck.optim_files:
        raise CkptError(str(ck.path), "no optimizer states (ZeRO-0 or weights only): DeepSpeed's universal form "
                        "needs them")
    root = Path(output_root) if output_root else ck.root
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{ck.tag}_universal"
    if final.exists() and not force:
        raise CkptError(str(final), "exists already (pass --force to replace it)")
    import torch
    from deepspeed.checkpoint import ds_to_universal as d2u
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    client = load_small(ck.mp_files[0])
    info = client.get(UNIVERSAL_CHECKPOINT_INFO) if isinstance(client, dict) else None
    injected = bloom_info(state) if not info else None
    n_extract, n_merge = worker_counts(ck, workers, merge_workers)
    size = sum(p.stat().st_size for p in ck.files())

    scratch = root / f".{ck.tag}_universal.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    out = scratch / final.name
    args = Namespace(input_folder=str(ck.path), output_folder=str(out), num_extract_workers=n_extract,
                     num_merge_workers=n_merge, keep_temp_folder=False, strict=True,
                     inject_missing_state=injected is not None)
    original_inject, original_check = d2u._inject_missing_state, d2u._check_for_required_state

    def inject(ds_checkpoint):
        if ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) is None:
            ds_checkpoint.global_state[UNIVERSAL_CHECKPOINT_INFO] = injected

    def check(ds_checkpoint):
        if keep_vocab_padding:
            info = dict(ds_checkpoint.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) or {})
            padded = state.padded_vocab_size
            if padded:
                info["original_vocab_size"] = padded
            ds_checkpoint.global_state[UNIVERSAL_CHECKPOINT_INFO] = info
        original_check(ds_checkpoint)

    if not quiet:
        print(f"converting {ck.path} ({human(size)}, tp {ck.tp} x pp {ck.pp} x dp {ck.dp}, {state.form} client "
              f"state) with {n_extract} extract / {n_merge} merge workers"
              + ("; universal_checkpoint_info missing: BLOOM's patterns supplied" if injected else ""), flush=True)
        padded, original = state.padded_vocab_size, state.original_vocab_size
        if padded and original and padded > original:
            if keep_vocab_padding:
                print(f"vocabulary: all {padded} rows kept (the {padded - original} padding rows after the "
                      f"tokenizer's {original} too), so resuming from the universal form equals resuming from "
                      f"this checkpoint; it loads at a padded vocabulary of {padded} or more", flush=True)
            else:
                print(f"WARNING: vocabulary padding rows DROPPED ({original} of {padded} rows kept, as "
                      f"--drop-vocab-padding asks): they load as zeros, so a resumed run's losses differ from "
                      f"resuming this checkpoint", flush=True)
    try:
        d2u._inject_missing_state, d2u._check_for_required_state = inject, check
        with contextlib.redirect_stdout(sys.stderr), guard_torch_load(check=False):  # checked above
            d2u.main(args)
        # The copied client states in mtf-train's form (a 2022 one would otherwise carry its megatron.enums
        # along), with the universal info loading reads.
        for mp in sorted(out.glob("mp_rank_*_model_states.pt")):
            sd = ClientState.read(safe_load(mp)).ours()
            if injected is not None:
                sd[UNIVERSAL_CHECKPOINT_INFO] = injected
            with atomic_path(mp) as tmp:
                torch.save(sd, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
        write_atomic(root / "latest_universal", final.name)
    except CkptError:
        raise
    except (AssertionError, RuntimeError, ValueError, KeyError, OSError) as err:
        raise CkptError(str(ck.path), f"DeepSpeed's converter failed: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    finally:
        d2u._inject_missing_state, d2u._check_for_required_state = original_inject, original_check
        shutil.rmtree(scratch, ignore_errors=True)
    return final
