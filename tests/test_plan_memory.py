"""The plan's activation memory model (hand-computed numbers), its choice of recomputation, and how the choice
reaches the trainer's command line."""
from __future__ import annotations

import pytest

from mtf_train.plan import block_activation_bytes, head_activation_bytes
from mtf_train.rules import flops_per_token, loss_chunk_rows
from tests.helpers import RECIPES, mtf, one_line_error
from tests.test_plan_render import plan_json

# bloom-1b1 shape: seq 2048, micro 4, hidden 1536, 16 heads, TP 1, bf16 (2 bytes), vocab 250880.
S, B, H, A, V = 2048, 4, 1536, 16, 250880
SBH = S * B * H  # 12,582,912 elements


def test_block_memory_by_hand_bloom_1b1_shape():
    # none, FlexAttention: 17 bf16 tensors of s*b*h (2 layer-norm inputs, 2 outputs, fused QKV = 3, kernel output,
    # context copy, GeLU input and output = 4 + 4) + float32 log-sum-exp (16 heads x s x b) + layer-norm stats.
    assert block_activation_bytes("none", S, B, H, A, 1, 2, flex=True) == \
        17 * SBH * 2 + 4 * 16 * 2048 * 4 + 16 * 2048 * 4 == 428_474_368
    # none, reference attention: 16 tensors of s*b*h, and the softmax's float32 output plus its bf16 copy:
    # 16 x 2048 x 2048 x 4 x (4 + 2) bytes = 1.5 GiB per block, the matrix FlexAttention never holds.
    assert block_activation_bytes("none", S, B, H, A, 1, 2, flex=False) == \
        16 * SBH * 2 + 16 * 2048 * 2048 * 4 * 6 + 16 * 2048 * 4 == 2_013_396_992
    # selective: block input, QKV (3), h->4h (4), both row-parallel outputs (2), FlexAttention's output and lse.
    assert block_activation_bytes("selective", S, B, H, A, 1, 2, flex=True) == \
        11 * SBH * 2 + 4 * 16 * 2048 * 4 == 277_348_352
    # full: the block input only.
    assert block_activation_bytes("full", S, B, H, A, 1, 2, flex=True) == SBH * 2 == 25_165_824
    # TP 2: the sharded tensors halve, the all-reduced outputs add two replicated ones under selective.
    assert block_activation_bytes("selective", S, B, H, A, 2, 2, flex=False) == (1 + 3.5 + 2 + 2) * SBH * 2


def test_head_memory_by_hand_is_one_loss_chunk_not_the_logits():
    # On CPU 256 MiB of float32 logits per chunk: 268435456 / (4 * 250880) = 267.5 rows -> 256 (a multiple of
    # 64); on GPUs 1 GiB: 1070 -> 1024 rows, and a TP 2 shard of the head twice as many.
    assert loss_chunk_rows(V, "cpu") == 256
    assert loss_chunk_rows(V) == 1024 and loss_chunk_rows(V // 2) == 2112
    # final norm input + output (2 x s*b*h bf16) + one chunk's logits and gradient + float32 weight-gradient sum
    head = head_activation_bytes(S, B, H, V, 1, 2)
    assert head == 2 * SBH * 2 + 2 * 1024 * 250880 * 4 + 250880 * 1536 * 4 == 3_646_947_328
    full_logits = 8 * B * S * V  # float32 logits and their gradient: what the plan counted before
    assert full_logits == 16_441_671_680 and head < full_logits / 4


def test_selective_flops_repeat_only_the_attention_core():
    l, h, s, v = 24, 1536, 2048, 250880
    none = flops_per_token(l, h, s, v, "none")
    assert none == 72 * l * h * h * (1 + s / (6 * h)) + 6 * h * v
    # Full recomputation repeats the blocks' forward, never the LM head.
    assert flops_per_token(l, h, s, v, "full") == pytest.approx(none + 24 * l * h * h * (1 + s / (6 * h)))
    assert flops_per_token(l, h, s, v, True) == flops_per_token(l, h, s, v, "full")  # finetune_t0's bool
    assert flops_per_token(l, h, s, v, "selective") == none + 4 * l * s * h
    assert flops_per_token(l, h, s, v, "selective", flex=True) == none


def test_auto_picks_the_least_recomputation_that_fits():
    small = plan_json("bloomz-560m.yaml")
    assert (small["recompute"], small["attention"]) == ("none", "flex")
    big = plan_json("bloomz-176b.yaml")  # 70 blocks over 72 stages, 1F1B keeps up to 72 micro batches in flight
    assert big["recompute"] == "selective"
    assert "none 86.7 GB" in big["recompute_reason"] and big["peak_memory_gb"] <= 72
    tight = plan_json("bloomz-7b1.yaml", "cluster.gpu_memory_gb=42")
    assert tight["recompute"] == "full" and tight["peak_memory_gb"] <= 42 * 0.9
    assert "selective 54.5 GB" in tight["recompute_reason"]
    hopeless = plan_json("bloomz-7b1.yaml", "cluster.gpu_memory_gb=20")
    assert hopeless["recompute"] == "full" and "nothing fits" in hopeless["recompute_reason"]
    assert any("exceeds cluster.gpu_memory_gb 20" in n for n in hopeless["notes"])
    # A recipe's explicit mode is kept, and finetune_t0's switch still reads as full / none.
    assert plan_json("bloomz-560m.yaml", "training.recompute=selective")["recompute"] == "selective"
    assert plan_json("bloomz-560m.yaml", "training.checkpoint_activations=true")["recompute"] == "full"


def test_plan_prints_what_it_chose_and_why():
    out = mtf("plan", str(RECIPES / "bloomz-176b.yaml"), check=True).stdout
    assert "recompute    selective (auto: least recomputation that fits 72.0 GB (90% of cluster.gpu_memory_gb " \
           "80); peak none 86.7 GB, selective" in out
    assert "(flex attention)" in out


def _program_args(tmp_path, recipe: str, *sets: str) -> list[str]:
    from tests.test_plan_render import program_args

    args = ["render", str(RECIPES / recipe), "-o", str(tmp_path / "job")]
    for s in sets:
        args += ["--set", s]
    mtf(*args, check=True)
    return program_args((tmp_path / "job" / "job.sbatch").read_text())


def test_resolved_mode_and_compile_reach_the_trainer(tmp_path):
    args = _program_args(tmp_path, "bloomz-7b1.yaml", "cluster.gpu_memory_gb=40", "training.compile=false")
    assert args[args.index("--recompute") + 1] == "full"
    assert "--checkpoint-activations" in args and "--no-compile" in args  # finetune_t0's flag stays
    args = _program_args(tmp_path / "b", "bloomz-560m.yaml")
    assert args[args.index("--recompute") + 1] == "none"
    assert "--checkpoint-activations" not in args and "--deepspeed-activation-checkpointing" not in args
    assert "--compile" not in args and "--no-compile" not in args  # unset: the trainer compiles on GPUs only


def test_trainer_reads_recompute_and_compile():
    from mtf_train.train.args import TrainerArgsError, parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--tokenizer-name-or-path", "t", "--train-weighted-split-paths-path", "p"]
    assert (parse_args(base).recompute, parse_args(base).compile) == ("none", None)
    assert parse_args(base + ["--checkpoint-activations"]).recompute == "full"
    assert parse_args(base + ["--checkpoint-activations", "--recompute", "full"]).recompute == "full"
    assert parse_args(base + ["--recompute", "selective", "--compile"]).compile is True
    assert parse_args(base + ["--no-compile"]).compile is False
    with pytest.raises(TrainerArgsError, match="--checkpoint-activations means --recompute full, not selective"):
        parse_args(base + ["--checkpoint-activations", "--recompute", "selective"])


def test_contradicting_or_unsupported_recompute_is_one_line():
    line = one_line_error(mtf("plan", str(RECIPES / "bloomz-560m.yaml"), "--set", "training.recompute=none",
                              "--set", "training.checkpoint_activations=true"))
    assert "training." in line and "contradicts checkpoint_activations true" in line
    line = one_line_error(mtf("plan", str(RECIPES / "bloomz-176b.yaml"), "--set", "runtime.kind=megatron_deepspeed",
                              "--set", "runtime.megatron_deepspeed_dir=/opt/M", "--set", "training.recompute=selective"))
    assert "training.recompute" in line and "none or full" in line
