"""`python -m mtf_train.ranks --nproc_per_node 2 -m loss_parity OUT`:
the chunked LM head + cross entropy (`BloomLoss`, logits at target positions
only) against the full-logits path (megatron's `vocab_parallel_cross_entropy`), at TP=1 and TP=2, fp32 and
bf16, with and without norm-target-loss: same loss and same gradient for every parameter. Then one step of
DeepSpeed's pipeline engine at TP=2: its last stage keeps hidden states, not logits, in its buffers.
Writes a JSON report to argv[1]; exits non-zero on a mismatch."""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from bloom_tiny import micro_batches, perturb_, tiny_config
from mtf_train.train import hf_names, parallel
from mtf_train.train.loss import logits_loss
from mtf_train.train.model import BloomModel, BloomPipeline
from mtf_train.train.parallel import pipe_topology

CHUNK_ROWS = 5  # several chunks per micro batch (2 rows x 16 positions, 15 targets)
# bf16: the two paths round the same products at different points (whole matrix vs chunks, fp32 sum).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-3, 1e-2)}  # (loss rel., grad max diff / max abs)


def compare(model, batch, norm: bool, dtype) -> dict:
    (tokens, seg), (labels, loss_mask, _) = batch
    model.loss_fn.norm_target_loss = norm
    model.zero_grad(set_to_none=True)
    ref = logits_loss(model(tokens, seg), (labels, loss_mask, seg), norm)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model(tokens, seg, labels, loss_mask)
    loss.backward()
    rel = []
    for n, p in model.named_parameters():
        scale = ref_grads[n].float().abs().max().item()
        rel.append((p.grad.float() - ref_grads[n].float()).abs().max().item() / max(scale, 1e-12))
    return {"loss": loss.item(), "ref_loss": ref.item(), "loss_rel": abs(loss.item() - ref.item()) / abs(ref.item()),
            "grad_rel": max(rel), "grad_dtype": str(next(model.parameters()).grad.dtype)}


def check(out_path: str) -> None:
    config = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    batch = micro_batches(1)[0]
    cases = []
    parallel.init_parallel(tp=1)
    ref_model = BloomModel(config)
    perturb_(ref_model)
    full_state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    for tp in (1, 2):
        if tp == 2:
            parallel.destroy_parallel()
            state = parallel.init_parallel(tp=2)
        for dtype in (torch.float32, torch.bfloat16):
            model = BloomModel(config)
            model.load_state_dict(hf_names.split_tp(full_state, tp, dist.get_rank() % tp), strict=True)
            model.to(dtype)
            model.loss_fn.chunk_rows = CHUNK_ROWS
            for norm in (False, True):
                r = compare(model, batch, norm, dtype)
                loss_tol, grad_tol = TOL[dtype]
                r.update(tp=tp, dtype=str(dtype), norm=norm, ok=r["loss_rel"] < loss_tol and r["grad_rel"] < grad_tol)
                cases.append(r)

    # DeepSpeed's pipeline engine (PP=1, TP=2): what its last stage keeps between forward and backward.
    pipe = BloomPipeline(config, pipe_topology(state))
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=0.01),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    loss = engine.train_batch(data_iter=iter(micro_batches(2)))
    kept = [tuple(o.shape) for o in engine.pipe_buffers["outputs"] if isinstance(o, torch.Tensor)]
    report = {"cases": cases, "pipe_loss": float(loss), "pipe_outputs": kept,
              "hidden_size": config.hidden_size, "local_vocab": config.padded_vocab_size // 2}
    report["ok"] = (all(c["ok"] for c in cases) and len(kept) > 0
                    and all(s[-1] == config.hidden_size for s in kept))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    print(json.dumps(report), flush=True)
    dist.barrier()
    sys.exit(0 if report["ok"] else 1)


def main(argv: list[str]) -> None:  # as mtf_train.ranks calls it
    check(*argv)


if __name__ == "__main__":
    main(sys.argv[1:])
