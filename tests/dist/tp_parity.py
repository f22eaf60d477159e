"""`python -m mtf_train.ranks --nproc_per_node 2 -m tp_parity OUT`:
a TP=2 model with weights split from a TP=1 model gives the same logits, loss
and (merged) gradients; and one step of DeepSpeed's (non-pipeline) engine with `MegatronMPU` and active
gradient clipping updates the TP=2 shards exactly like clipped SGD on the TP=1 model (the clip norm needs the
adapter's model-parallel group and megatron's tensor-parallel attributes to count every gradient once).
Writes a JSON report to argv[1]; exits non-zero on a mismatch."""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from bloom_tiny import micro_batches, perturb_, tiny_config
from mtf_train.train import hf_names, parallel
from mtf_train.train.model import BloomModel, gather_logits

ATOL = 1e-5
LR, CLIP = 0.1, 0.05


def run(model, batch):
    (tokens, seg), (labels, loss_mask, _) = batch
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens, seg)
    loss = model(tokens, seg, labels, loss_mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def check(out_path: str) -> None:
    config = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    batch = micro_batches(1)[0]

    # TP=1 reference (both ranks compute it: they are data-parallel replicas here).
    parallel.init_parallel(tp=1)
    ref_model = BloomModel(config, norm_target_loss=True)
    perturb_(ref_model)
    ref_logits, ref_loss, ref_grads = run(ref_model, batch)
    full_state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), CLIP).item()
    with torch.no_grad():
        stepped = {n: p - LR * p.grad for n, p in ref_model.named_parameters()}

    parallel.destroy_parallel()
    state = parallel.init_parallel(tp=2)
    model = BloomModel(config, norm_target_loss=True)
    model.load_state_dict(hf_names.split_tp(full_state, 2, state.tp_rank), strict=True)
    vocab_shard_logits, loss, grads = run(model, batch)
    logits = gather_logits(vocab_shard_logits)

    # Gradients of every shard from both ranks, merged with the checkpoint rules.
    shards = [None, None]
    dist.all_gather_object(shards, grads)
    replicated_spread = max(
        (shards[0][n] - shards[1][n]).abs().max().item() for n in grads if hf_names.tp_partition_dim(n) is None
    )
    merged = hf_names.merge_tp(shards)

    # DeepSpeed engine + MegatronMPU: one clipped SGD step on a fresh TP=2 model.
    ds_model = BloomModel(config, norm_target_loss=True)
    ds_model.load_state_dict(hf_names.split_tp(full_state, 2, state.tp_rank), strict=True)
    engine, _, _, _ = deepspeed.initialize(
        model=ds_model, optimizer=torch.optim.SGD(ds_model.parameters(), lr=LR), mpu=parallel.MegatronMPU(),
        config={"train_micro_batch_size_per_gpu": batch[0][0].shape[0], "gradient_accumulation_steps": 1,
                "gradient_clipping": CLIP, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9},
    )
    (tokens, seg), (labels, loss_mask, _) = batch
    engine.backward(engine(tokens, seg, labels, loss_mask))
    engine.step()
    after = [None, None]
    dist.all_gather_object(after, {n: p.detach().clone() for n, p in ds_model.named_parameters()})
    after = hf_names.merge_tp(after)
    report = {
        "rank": state.rank,
        "tp_rank": state.tp_rank,
        "local_vocab": vocab_shard_logits.shape[-1],
        "logits_max_diff": (logits - ref_logits).abs().max().item(),
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "grad_max_diff": max((merged[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
        "replicated_grad_spread": replicated_spread,
        "ref_grad_norm": ref_norm,
        "step_max_diff": max((after[n] - stepped[n]).abs().max().item() for n in stepped),
        "step_max_update": max((stepped[n] - full_state[n]).abs().max().item() for n in stepped),
    }
    ok = (
        report["local_vocab"] == config.padded_vocab_size // 2
        and report["logits_max_diff"] < ATOL
        and abs(report["loss"] - report["ref_loss"]) < ATOL
        and report["grad_max_diff"] < ATOL
        and report["step_max_diff"] < 1e-6
    )
    report["ok"] = ok
    if state.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    print(json.dumps(report), flush=True)
    dist.barrier()
    sys.exit(0 if ok else 1)


def main(argv: list[str]) -> None:  # as mtf_train.ranks calls it
    check(*argv)


if __name__ == "__main__":
    main(sys.argv[1:])
