"""Derived rules: every number that more than one stage computes from the same settings, written once.

Recipe validation, the plan, the data caches, the trainer and the checkpoint tools all import these, so that
they cannot disagree (a different eval sample count, for one, misses the data caches). Stdlib only and nothing
from mtf_train: the CLI's plan path imports it, and so does every job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# --- shape -------------------------------------------------------------------------------------------------


def data_parallel(world: int, tp: int, pp: int) -> int | None:
    """dp with world = pp x tp x dp; None when the world does not split into whole pipelines."""
    return world // (tp * pp) if world % (tp * pp) == 0 else None


def partition_units(num_layers: int, method: str) -> int:
    """Units DeepSpeed spreads over pipeline stages: the blocks, plus the two embedding units (input embedding,
    tied head) when `type:transformer|embedding` counts them like blocks."""
    return num_layers + (2 if "embedding" in method else 0)


def padded_vocab(vocab: int, tp: int, divisible_by: int, pad_to: int | None = None) -> int:
    """Rows of the embedding: `pad_to` when given (callers check it is not below `vocab`), else `vocab` rounded
    up to a multiple of divisible_by x tp (Megatron's rule, so every TP shard is equal and aligned)."""
    if pad_to is not None:
        return pad_to
    mult = divisible_by * tp
    return -(-vocab // mult) * mult


# --- batch -------------------------------------------------------------------------------------------------


def grad_accum(global_batch: int, micro: int, dp: int | None) -> int | None:
    """Micro batches per step and data-parallel rank (micro x dp x accumulation = global); None if not whole."""
    return global_batch // (micro * dp) if dp and global_batch % (micro * dp) == 0 else None


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch size after `consumed` samples, with Megatron's linear ramp-up."""
    global_batch: int
    rampup: tuple[int, int, int] | None = None   # start, increment, ramp-up samples

    def __call__(self, consumed: int) -> int:
        if self.rampup is None:
            return self.global_batch
        start, inc, samples = self.rampup
        steps = max(1, (self.global_batch - start) // inc)
        return min(self.global_batch, start + int(consumed / (samples / steps)) * inc)

    def iterations(self, train_samples: int) -> int:
        consumed = iters = 0
        while consumed < train_samples:
            consumed += self(consumed)
            iters += 1
        return iters

    def samples(self, iters: int) -> int:
        consumed = 0
        for _ in range(iters):
            consumed += self(consumed)
        return consumed

    def length(self, iters: int | None, samples: int | None) -> tuple[int | None, int | None]:
        """(iterations, samples) of a run given one of them (samples win, as in Megatron); (None, None) if neither."""
        if samples is not None:
            return self.iterations(samples), samples
        if iters is not None:
            return iters, self.samples(iters)
        return None, None


def eval_samples_per_group(train_iters: int, eval_interval: int, eval_iters: int, global_batch: int) -> int:
    """Validation samples each group needs for a whole run (Megatron's sizing: one evaluation per interval and
    one at the end). The trainer and `mtf-train data` size the validation caches with it: equal or a miss."""
    return (train_iters // eval_interval + 1) * eval_iters * global_batch


# --- FLOPs ---------------------------------------------------------------------------------------------------


def flops_per_token(num_layers: int, hidden: int, seq: int, vocab: int, recompute: bool | str,
                    flex: bool = False) -> float:
    """Training FLOPs per token (Narayanan et al. 2021): 96 * l * h^2 * (1 + s/(6h) + V/(16*l*h)) with full
    recomputation, the per-step formula divided by the B*s tokens of a step. Its last term is the LM head's
    6*h*V, which is never recomputed: without recomputation only the blocks' 96 becomes 72, giving
    72*l*h^2*(1 + s/(6h)) + 6*h*V = 6N + 12*l*h*s (N with the head), the model FLOPs for MFU.
    `recompute`: a mode (none, selective, full) or finetune_t0's bool. Selective recomputation repeats no GEMM;
    with the reference attention it repeats the attention core's forward (QK^T and PV: 4*s*h per token and
    layer), with FlexAttention (`flex`) nothing of note (its fused kernel's output is kept)."""
    mode = recompute if isinstance(recompute, str) else ("full" if recompute else "none")
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"unknown recompute mode {mode!r}")
    blocks = (96 if mode == "full" else 72) * num_layers * hidden * hidden * (1 + seq / (6 * hidden))
    flops = blocks + 6 * hidden * vocab
    if mode == "selective" and not flex:
        flops += 4 * num_layers * seq * hidden
    return flops


# --- the chunked loss ----------------------------------------------------------------------------------------

# The chunked LM-head loss (train/loss.py) takes as many rows per chunk as make one chunk's float32 logits
# about this large (at least 64 rows, a multiple of 64 so GPU matrix multiplies keep full tiles). On GPUs each
# chunk of a low-precision weight also adds its weight gradient into a float32 sum (a pass over 6 bytes x V x h),
# so chunks there are larger: 1 GiB is 1024 rows at V = 250880, two to three chunks per micro batch of 4 x 2048
# with a quarter targets. The plan's memory model counts the same chunks.
LOSS_CHUNK_BYTES = {"cuda": 2**30, "cpu": 256 * 2**20}


def loss_chunk_rows(local_vocab: int, device_type: str = "cuda") -> int:
    """Rows per chunk of the chunked vocabulary-parallel loss over a head of `local_vocab` rows (V / tp)."""
    chunk_bytes = LOSS_CHUNK_BYTES.get(device_type, LOSS_CHUNK_BYTES["cuda"])
    return max(64, chunk_bytes // (4 * local_vocab) // 64 * 64)


# --- SLURM time ----------------------------------------------------------------------------------------------


def parse_time_minutes(text: str) -> int | None:
    """SLURM time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, in whole minutes (seconds round up).
    None if malformed."""
    days, dash, rest = text.strip().partition("-")
    if not dash:
        days, rest = "0", days
    try:
        d = int(days)
        parts = [int(p) for p in rest.split(":")]
    except ValueError:
        return None
    if d < 0 or any(p < 0 for p in parts) or not 1 <= len(parts) <= 3:
        return None
    if dash:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return d * 1440 + h * 60 + m + math.ceil(s / 60)

