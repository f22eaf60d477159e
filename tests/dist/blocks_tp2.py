"""`python -m mtf_train.ranks --nproc_per_node 2 -m blocks_tp2 OUT`:
at TP=2 a transformer block traces to one graph without breaks in every
recompute mode (the TP all-reduces are functional collectives inside the graph), and the compiled blocks'
outputs and gradients equal the eager ones. Compiled with AOTAutograd's eager backend: it traces and partitions
exactly what inductor gets, collectives included, without minutes of C++ compilation on two CPU processes
(tests/test_train_blocks.py checks inductor's numerics at TP=1). Writes a JSON report to argv[1]."""
from __future__ import annotations

import json
import sys

import torch
import torch._dynamo as dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters

from bloom_tiny import packed_rows, perturb_, tiny_config
from mtf_train.train import hf_names, parallel
from mtf_train.train.loss import prepare_batch
from mtf_train.train.model import BloomTransformerLayer, _block_forward


def layers(**overrides):
    out = [BloomTransformerLayer(tiny_config(**overrides), hf_names.FIRST_BLOCK_LAYER + i) for i in range(2)]
    for i, layer in enumerate(out):
        perturb_(layer, seed=i)
    return out


def forward_backward(blocks, x0, seg, run=_block_forward):
    x = x0.clone().requires_grad_()
    y = x
    for block in blocks:
        impl, mask, slopes = block.self_attention.attention_inputs(y, seg)
        y = run(block, y, seg, impl, mask, slopes)
    (y ** 2).mean().backward()
    return [y.detach(), x.grad] + [p.grad for block in blocks for p in block.parameters()]


def check(out_path: str) -> None:
    state = parallel.init_parallel(tp=2)
    seg = prepare_batch(*packed_rows())[3]
    x0 = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))  # the same on both ranks
    report = {"tp": state.tp, "modes": {}}
    for mode in ("none", "selective", "full"):
        (first, _) = layers(recompute=mode)
        x = x0.clone().requires_grad_()
        impl, mask, slopes = first.self_attention.attention_inputs(x, seg)
        dynamo.reset()
        explained = dynamo.explain(_block_forward)(first, x, seg, impl, mask, slopes)
        eager = forward_backward(layers(recompute=mode), x0, seg)
        dynamo.reset()
        counters.clear()
        compiled = forward_backward(layers(recompute=mode), x0, seg,
                                    torch.compile(_block_forward, backend="aot_eager", dynamic=False))
        report["modes"][mode] = {
            "graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "compiled_graph_breaks": sum(counters["graph_break"].values()),
            "max_diff": max((a - b).abs().max().item() for a, b in zip(compiled, eager)),
            "max_abs": max(b.abs().max().item() for b in eager),
        }
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(report, fh)
    dist.barrier()


def main(argv: list[str]) -> None:  # as mtf_train.ranks calls it
    check(*argv)


if __name__ == "__main__":
    main(sys.argv[1:])
