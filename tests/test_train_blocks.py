"""Transformer blocks: one graph each under torch.compile (with and without recomputation), compiled equal to
eager, every recompute mode equal to none, and the activation memory each mode really holds (measured with the
profiler's allocation events) equal to the plan's memory model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from bloom_tiny import packed_rows, perturb_, tiny_config  # noqa: E402

from mtf_train.plan import block_activation_bytes  # noqa: E402
from mtf_train.train import hf_names  # noqa: E402
from mtf_train.train.loss import prepare_batch  # noqa: E402

MODES = ("none", "selective", "full")


@pytest.fixture(scope="module")
def tp1():
    from mtf_train.train import parallel

    return parallel.init_parallel(tp=1, pp=1)


def _layers(n: int, dtype=torch.float32, **overrides):
    from mtf_train.train.model import BloomTransformerLayer

    layers = [BloomTransformerLayer(tiny_config(**overrides), hf_names.FIRST_BLOCK_LAYER + i) for i in range(n)]
    for i, layer in enumerate(layers):
        perturb_(layer, seed=i)
        layer.to(dtype)
    return layers


def _segments():
    return prepare_batch(*packed_rows())[3]  # [2, 16], three and two packed examples plus padding


def _forward_backward(layers, x0: torch.Tensor, seg: torch.Tensor):
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    y = x
    for layer in layers:
        y = layer((y, seg))[0]
    (y.float() ** 2).mean().backward()
    return [y.detach(), x.grad] + [p.grad for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("mode", MODES)
def test_block_is_one_graph_without_breaks(tp1, mode):
    """megatron's linear forward (a graph break per layer) and the mask cache (an eager fallback under
    checkpointing) stay outside: Dynamo sees one graph per block, and one graph serves every block."""
    from torch._dynamo.testing import CompileCounter

    from mtf_train.train.model import _block_forward

    layers = _layers(2, recompute=mode)
    seg = _segments()
    x = torch.randn(2, 16, 64, requires_grad=True)
    impl, mask, slopes = layers[0].self_attention.attention_inputs(x, seg)
    dynamo.reset()
    explained = dynamo.explain(_block_forward)(layers[0], x, seg, impl, mask, slopes)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    if mode != "none":  # the checkpointed region really was captured as one, not run eagerly
        assert any("checkpoint" in str(node.target) for g in explained.graphs for node in g.graph.nodes)

    dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_block_forward, backend=counter, dynamic=False)
    y = x
    for layer in layers:
        impl, mask, slopes = layer.self_attention.attention_inputs(y, seg)
        y = compiled(layer, y, seg, impl, mask, slopes)
    y.sum().backward()
    assert counter.frame_count == 1  # the second block reused the first one's graph


def test_flex_block_is_one_graph(tp1):
    """The GPU path (FlexAttention, its block mask made outside the graph) also traces as one graph; on CPU
    FlexAttention has no backward, so this traces the forward."""
    from mtf_train.train.model import _block_forward

    (layer,) = _layers(1, attention="flex")
    seg = _segments()
    x = torch.randn(2, 16, 64)
    impl, mask, slopes = layer.self_attention.attention_inputs(x, seg)
    assert impl == "flex"
    dynamo.reset()
    with torch.no_grad():
        explained = dynamo.explain(_block_forward)(layer, x, seg, impl, mask, slopes)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("mode", MODES)
def test_compiled_blocks_equal_eager(tp1, mode):
    """`compile=True` (the trainer's GPU default) runs the blocks through inductor: outputs, input gradient and
    every parameter gradient equal the eager blocks'."""
    from torch._dynamo.utils import counters

    seg = _segments()
    x0 = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    eager = _forward_backward(_layers(2, recompute=mode), x0, seg)
    dynamo.reset()
    counters.clear()
    compiled = _forward_backward(_layers(2, recompute=mode, compile=True), x0, seg)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_modes_give_the_loss_and_gradients_of_none(tp1, dropout):
    """Recomputation replays dropout (the default generator and the model-parallel tracker) exactly."""
    from mtf_train.train import parallel
    from mtf_train.train.model import BloomModel

    tokens, labels, loss_mask, seg = prepare_batch(*packed_rows())
    results = {}
    for mode in MODES:
        model = BloomModel(tiny_config(recompute=mode, hidden_dropout=dropout, attention_dropout=dropout)).train()
        perturb_(model)
        parallel.seed_everything(7, tp1)
        loss = model(tokens, seg, labels, loss_mask)
        loss.backward()
        results[mode] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    loss0, grads0 = results["none"]
    for mode in ("selective", "full"):
        loss, grads = results[mode]
        assert loss == pytest.approx(loss0, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads0[name], atol=1e-6, rtol=0)


def _allocation_trace(fn) -> tuple[int, int]:
    """(bytes still allocated after `fn`, peak bytes allocated during it), from the profiler's allocation
    events: on CPU torch keeps no allocator statistics."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return live, peak


def test_recompute_lowers_measured_peak_memory(tp1):
    """Forward + backward of 4 blocks at b=2, s=128: full < selective < none in peak allocated memory."""
    seg = torch.ones(2, 128, dtype=torch.long)
    x0 = torch.randn(2, 128, 64)
    peaks = {}
    for mode in MODES:
        layers = _layers(4, recompute=mode)
        peaks[mode] = _allocation_trace(lambda: _forward_backward(layers, x0, seg))[1]
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
    assert peaks["selective"] < 0.7 * peaks["none"], peaks


@pytest.mark.parametrize("mode, dtype", [("none", torch.float32), ("none", torch.bfloat16),
                                         ("selective", torch.bfloat16), ("full", torch.float32)])
def test_plan_memory_model_matches_what_a_block_holds(tp1, mode, dtype):
    """What each extra block keeps allocated after the forward (measured: 4 blocks minus 2 blocks, halved)
    is the plan's `block_activation_bytes` for the reference attention (the CPU path), within 1%."""
    b, s, h, a = 2, 128, 64, 4
    seg = torch.ones(b, s, dtype=torch.long)
    x0 = torch.randn(b, s, h, dtype=dtype)

    def held(n: int) -> int:
        layers = _layers(n, dtype=dtype, recompute=mode)
        x = x0.clone().requires_grad_()
        out = []

        def forward():
            y = x
            for layer in layers:
                y = layer((y, seg))[0]
            out.append(y)

        return _allocation_trace(forward)[0]

    held(1)  # first-call allocations (lazy library state) out of the way
    per_block = (held(4) - held(2)) / 2
    want = block_activation_bytes(mode, s, b, h, a, tp=1, e=dtype.itemsize, flex=False)
    if mode != "none":  # checkpointing also keeps the CPU generator's state per block (5 KB, not planned)
        want += torch.get_rng_state().numel()
    assert per_block == pytest.approx(want, rel=0.01), (per_block, want)
