"""The built-in trainer's model half, in one process (TP=1): HF parity, packed attention, loss, layout."""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from bloom_tiny import VOCAB, packed_rows, perturb_, tiny_config  # noqa: E402

from mtf_train.train import attention as attn  # noqa: E402
from mtf_train.train import hf_names  # noqa: E402
from mtf_train.train.loss import head_token_losses, logits_loss, masked_loss, prepare_batch  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def tp1():
    """A 1-process gloo group and megatron-core TP=1 groups (megatron's layers need a TP group)."""
    from mtf_train.train import parallel

    return parallel.init_parallel(tp=1, pp=1)


def _model(config, seed=0):
    from mtf_train.train.model import BloomModel

    model = BloomModel(config).eval()
    perturb_(model, seed=seed)
    return model


# --- HF parity ----------------------------------------------------------------------------------------------


def test_logits_match_hf_bloom(tp1):
    from transformers import BloomConfig, BloomForCausalLM

    from mtf_train.train.model import BloomModel, BloomModelConfig

    hf_config = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                            attention_dropout=0.0)
    torch.manual_seed(0)
    hf = BloomForCausalLM(hf_config).eval()
    perturb_(hf, seed=1)  # biases and layer norms away from 0/1, so a mis-mapped one shows
    config = BloomModelConfig.from_hf(hf_config, attention="reference")
    assert BloomModelConfig.from_hf(BloomConfig(**config.to_hf_kwargs()), attention="reference") == config
    ours = BloomModel(config).eval()
    ours.load_state_dict(hf_names.from_hf_state_dict(hf.state_dict(), config.num_layers), strict=True)

    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.ones_like(ids))
    assert got.shape == expected.shape == (2, 24, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # And back: our weights exported with HF names reproduce the same HF model.
    hf2 = BloomForCausalLM(hf_config).eval()
    hf2.load_state_dict(hf_names.to_hf_state_dict(ours.state_dict(), config.num_layers, prefix="transformer."))
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=ids).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("heads", [4, 12, 16, 32, 112])
def test_alibi_slopes_match_hf(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    hf = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope * position 1
    torch.testing.assert_close(attn.alibi_slopes(heads), hf, atol=1e-7, rtol=1e-6)


# --- packed attention ---------------------------------------------------------------------------------------


def test_packed_example_equals_example_alone(tp1):
    model = _model(tiny_config())
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (5,), generator=g), torch.randint(0, VOCAB, (7,), generator=g)
    row = torch.cat([a, b, torch.full((4,), 3)])[None]
    seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4])
    with torch.no_grad():
        packed = model(row, seg)
        alone_a = model(a[None], torch.ones(1, 5, dtype=torch.long))
        alone_b = model(b[None], torch.ones(1, 7, dtype=torch.long))
        other_pad = model(torch.cat([a, b, torch.randint(0, VOCAB, (4,), generator=g)])[None], seg)
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed[0, :5], alone_a[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[0, 5:12], alone_b[0], atol=ATOL, rtol=0)  # B sits at 5..11 in the row
    torch.testing.assert_close(other_pad[0, :12], packed[0, :12], atol=0, rtol=0)  # padding never leaks


def test_attention_mask_blocks_other_examples_and_future():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = attn.packed_causal_mask(seg)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def _qkv(b=2, h=4, s=24, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype).to(device) for _ in range(3)]


def _segments(s=24, device="cpu"):
    return torch.tensor([[1] * 7 + [2] * 9 + [3] * 5 + [0] * 3, [1] * 20 + [0] * 4])[:, :s].to(device)


def test_reference_attention_matches_naive_per_example():
    """The reference path against a per-example loop with absolute-position ALiBi (Megatron/HF form)."""
    q, k, v = _qkv()
    seg = _segments()
    slopes = attn.alibi_slopes(4)
    out = attn.reference_attention(q, k, v, seg, slopes)
    for row in range(2):
        for sid in set(seg[row].tolist()) - {0}:
            idx = (seg[row] == sid).nonzero().flatten()
            qs, ks, vs = q[row][:, idx], k[row][:, idx], v[row][:, idx]
            n = len(idx)
            scores = qs @ ks.transpose(-1, -2) / math.sqrt(16) + slopes[:, None, None] * torch.arange(n)
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            torch.testing.assert_close(out[row][:, idx], scores.softmax(-1) @ vs, atol=ATOL, rtol=0)


def test_flex_matches_reference_forward_cpu():
    """FlexAttention (eager: torch has no CPU backward for it) agrees with the reference in the forward."""
    q, k, v = _qkv()
    seg = _segments()
    slopes = attn.alibi_slopes(4)
    ref = attn.reference_attention(q, k, v, seg, slopes)
    with torch.no_grad():
        flex = attn.flex_attention(q, k, v, seg, slopes, compiled=False)
    torch.testing.assert_close(flex, ref, atol=ATOL, rtol=0)


def test_flex_model_matches_reference_model_forward(tp1):
    ref_model = _model(tiny_config(attention="reference"))
    flex_model = _model(tiny_config(attention="flex"))
    flex_model.load_state_dict(ref_model.state_dict())
    ids, seg, _ = packed_rows()
    with torch.no_grad():
        torch.testing.assert_close(flex_model(ids, seg), ref_model(ids, seg), atol=ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward has no CPU kernel; fused "
                    "(compiled) forward+backward is checked on a GPU")
def test_flex_matches_reference_forward_backward_cuda():
    seg = _segments(device="cuda")
    slopes = attn.alibi_slopes(4).cuda()
    grads = []
    for impl in ("reference", "flex"):
        q, k, v = (t.requires_grad_() for t in _qkv(device="cuda"))
        fn = attn.reference_attention if impl == "reference" else attn.flex_attention
        out = fn(q, k, v, seg, slopes)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


def test_resolve_impl():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attn.resolve_impl("auto", cpu, False) == "reference"
    assert attn.resolve_impl("auto", cuda, False) == "flex"
    assert attn.resolve_impl("auto", cuda, True) == "reference"  # flex has no attention dropout
    with pytest.raises(ValueError):
        attn.resolve_impl("flex", cuda, True)


# --- loss ---------------------------------------------------------------------------------------------------


def test_prepare_batch():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 3, 3]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 0, 0]])
    is_input = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    tokens, labels, mask, seg_out = prepare_batch(ids, seg, is_input)
    assert tokens.tolist() == [[10, 11, 12, 13, 14, 15, 3]]
    assert labels.tolist() == [[11, 12, 13, 14, 15, 3, 3]]
    assert mask.tolist() == [[True, True, False, False, True, False, False]]
    assert seg_out.tolist() == [[1, 1, 1, 2, 2, 2, 0]]


def test_loss_target_only_and_norm_target_loss_by_hand():
    ids, seg, is_input = packed_rows(batch=2, seq=16, seed=5)
    tokens, labels, mask, seg_t = prepare_batch(ids, seg, is_input)
    losses = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)) * 5

    # By hand: plain mean over target positions; per example (row, segment) means, then their mean.
    total, count, per_example = 0.0, 0, []
    for r in range(tokens.shape[0]):
        for sid in sorted(set(seg_t[r].tolist()) - {0}):
            vals = [losses[r, t].item() for t in range(tokens.shape[1]) if mask[r, t] and seg_t[r, t] == sid]
            assert vals, "every example of the fixture has target tokens"
            total, count = total + sum(vals), count + len(vals)
            per_example.append(sum(vals) / len(vals))
    assert len(per_example) == 5 and count == int(mask.sum())
    assert masked_loss(losses, mask, seg_t, norm_target_loss=False).item() == pytest.approx(total / count, abs=1e-6)
    assert masked_loss(losses, mask, seg_t, norm_target_loss=True).item() == pytest.approx(
        sum(per_example) / len(per_example), abs=1e-6)
    # The two differ here (examples have different target lengths), so the test can tell them apart.
    assert abs(total / count - sum(per_example) / len(per_example)) > 1e-3
    # finetune_t0's formulation (each maximal run of target labels in the flattened micro batch weighted by
    # 1/run length, divided by the number of runs) gives the same value when examples have inputs.
    flat, runs, weights, run_len = mask.reshape(-1).tolist(), 0, [], 0
    for i, m in enumerate(flat + [False]):
        if m:
            run_len += 1
        elif run_len:
            weights += [1.0 / run_len] * run_len
            runs, run_len = runs + 1, 0
        if i < len(flat) and not m:
            weights.append(0.0)
    run_based = (losses.reshape(-1) * torch.tensor(weights)).sum().item() / runs
    assert masked_loss(losses, mask, seg_t, norm_target_loss=True).item() == pytest.approx(run_based, abs=1e-6)
    # No target token at all: 0, not NaN.
    assert masked_loss(losses, torch.zeros_like(mask), seg_t, norm_target_loss=True).item() == 0.0


def test_vocab_parallel_loss_matches_cross_entropy(tp1):
    ids, seg, is_input = packed_rows()
    tokens, labels, mask, seg_t = prepare_batch(ids, seg, is_input)
    logits = torch.randn(*tokens.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    token_losses = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view_as(labels)
    for norm in (False, True):
        expected = masked_loss(token_losses, mask, seg_t, norm)
        got = logits_loss(logits.clone(), (labels, mask, seg_t), norm)
        assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def _loss_and_grads(loss_fn, hidden, weight):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", [False, True], ids=["token-mean", "norm-target-loss"])
def test_chunked_head_loss_equals_logits_path(tp1, dtype, norm):
    """The chunked head + cross entropy (logits at target positions only, recomputed in backward) gives the
    logits path's loss and gradients, for chunks of 1 row, uneven chunks and one chunk, and with no target."""
    ids, seg, is_input = packed_rows(batch=2, seq=16)
    tokens, labels, mask, seg_t = prepare_batch(ids, seg, is_input)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(*tokens.shape, 32, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, 32, generator=g) * 0.5).to(dtype)
    assert 0 < int(mask.sum()) < mask.numel()

    def old(h, w):
        return logits_loss(F.linear(h, w), (labels, mask, seg_t), norm)

    ref_loss, ref_dh, ref_dw = _loss_and_grads(old, hidden, weight)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for chunk_rows in (1, 5, 64):
        def new(h, w):
            return masked_loss(head_token_losses(h, w, labels, mask, chunk_rows=chunk_rows), mask, seg_t, norm)

        loss, dh, dw = _loss_and_grads(new, hidden, weight)
        assert loss.dtype == ref_loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
        assert dh.dtype == dtype and dw.dtype == dtype
        torch.testing.assert_close(dh, ref_dh, **tol)
        torch.testing.assert_close(dw, ref_dw, **tol)
        assert dh[~mask].abs().max() == 0 and dw.abs().max() > 0
    # No target at all: loss 0 and zero (not missing) gradients, as on the logits path.
    none = torch.zeros_like(mask)
    loss, dh, dw = _loss_and_grads(
        lambda h, w: masked_loss(head_token_losses(h, w, labels, none, chunk_rows=4), none, seg_t, norm),
        hidden, weight)
    assert loss.item() == 0.0 and dh.abs().max() == 0 and dw is not None and dw.abs().max() == 0


def test_model_loss_never_builds_full_logits(tp1):
    """BloomModel's loss (the pipeline's loss_fn) equals the loss over full logits with the same gradient for
    every parameter, multiplies the head only at target positions, a chunk at a time, and saves nothing
    vocabulary-wide for backward (the logits path saves its [b, s, V] softmax)."""
    from mtf_train.train.model import BloomModel

    config = tiny_config(hidden_size=48)  # 4h != V: only the head makes vocabulary-wide tensors
    model = BloomModel(config, norm_target_loss=True)
    perturb_(model)
    head = model.lm_head().word_embeddings.weight
    ids, seg, is_input = packed_rows(batch=2, seq=16)
    tokens, labels, mask, seg_t = prepare_batch(ids, seg, is_input)

    def saved_vocab_wide(run):
        shapes = []

        def pack(t):
            if t.dim() and t.shape[-1] == VOCAB and t.data_ptr() != head.data_ptr():
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run()
        return loss, shapes

    model.zero_grad()
    ref, ref_saved = saved_vocab_wide(lambda: logits_loss(model(tokens, seg_t), (labels, mask, seg_t), True))
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (2, 16, VOCAB) in ref_saved
    model.zero_grad()
    model.loss_fn.chunk_rows = 3
    logit_rows = []  # rows of every matrix product with the head weight

    class HeadProducts(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.linear and any(isinstance(a, torch.Tensor) and a.data_ptr() == head.data_ptr()
                                        for a in args):
                logit_rows.append(out.shape[0])
            return out

    with HeadProducts():
        loss, saved = saved_vocab_wide(lambda: model(tokens, seg_t, labels, mask))
    loss.backward()
    assert saved == []
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert max(logit_rows) == 3 and sum(logit_rows) == int(mask.sum()) < tokens.numel() // 2


# --- layout: names, layer specs, universal checkpoint patterns ----------------------------------------------


def test_state_dict_names_and_no_extra_state(tp1):
    config = tiny_config(num_layers=3)
    model = _model(config)
    names = list(model.state_dict())
    assert names == hf_names.expected_module_names(3)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(names)
    assert not any("_extra_state" in n for n in names)
    layer = getattr(model, "3")
    assert sorted(layer.state_dict()) == sorted(
        f"{m}.{p}" for m in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                             "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        for p in ("weight", "bias"))
    assert sorted(model.tied_modules["embed"].state_dict()) == [
        "word_embeddings.norm.bias", "word_embeddings.norm.weight", "word_embeddings.weight"]
    assert sorted(getattr(model, "7").state_dict()) == ["bias", "weight"]
    # A state dict without _extra_state loads strictly (megatron's load pre-hook re-adds the key).
    model.load_state_dict(model.state_dict(), strict=True)


def test_layer_specs_order_and_partition_regex(tp1):
    """Indices of the bigscience layout (1 tied embedding, 3.. blocks, L+4 final norm), and which specs DeepSpeed's `type:transformer|embedding` counts
    (its `_find_layer_type`: case-insensitive regex search over class or function names)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from mtf_train.train.model import layer_specs

    specs = layer_specs(tiny_config(num_layers=4))
    names = [s.typename.__name__ if isinstance(s, LayerSpec) else s.__name__ for s in specs]
    assert names == ["pipe_inputs", "BloomEmbedding", "into_blocks"] + ["BloomTransformerLayer"] * 4 + [
        "drop_segment_ids", "BloomFinalLayerNorm", "BloomEmbedding"]
    regex = re.compile("transformer|embedding", re.IGNORECASE)
    assert [i for i, n in enumerate(names) if regex.search(n)] == [1, 3, 4, 5, 6, 9]
    assert isinstance(specs[1], TiedLayerSpec) and isinstance(specs[9], TiedLayerSpec)
    assert specs[1].key == specs[9].key == "embed" and specs[9].forward_fn is not None


def test_universal_checkpoint_patterns_agree_with_tp_rules(tp1):
    """Each parameter falls in exactly the category `hf_names` uses for TP split/merge, and every pattern
    is used (DeepSpeed's ds_to_universal asserts both, with `re.match`)."""
    from deepspeed.checkpoint import constants as C

    config = tiny_config(num_layers=2)
    model = _model(config)
    info = model.universal_checkpoint_info
    assert info[C.ORIGINAL_VOCAB_SIZE] == 250
    lists = {key: info[key] for key in (C.PARAMETER_TO_AVERAGE_PATTERNS, C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                       C.VOCABULARY_PARAMETER_PATTERNS, C.PIPELINE_REPLICATED_PARAMETER_PATTERNS)}
    used = set()
    for name, _ in model.named_parameters():
        hits = {key: [p for p in pats if re.match(p, name)] for key, pats in lists.items()}
        for key, h in hits.items():
            assert len(h) <= 1, (name, key, h)
            used.update(h)
        dim = hf_names.tp_partition_dim(name)
        assert bool(hits[C.PARAMETER_TO_AVERAGE_PATTERNS]) == (dim is None), name
        assert bool(hits[C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS]) == (dim == 1), name
        assert bool(hits[C.VOCABULARY_PARAMETER_PATTERNS]) == (name == "tied_modules.embed.word_embeddings.weight")
        assert bool(hits[C.PIPELINE_REPLICATED_PARAMETER_PATTERNS]) == name.startswith("tied_modules.")
    assert used == {p for pats in lists.values() for p in pats}


@pytest.mark.parametrize("init", [True, False])
def test_tensor_parallel_attributes_follow_tp_rules(tp1, init):
    """DeepSpeed's grad norm / ZeRO read megatron's `tensor_model_parallel` / `partition_dim` attributes; they
    must agree with the split rules, also when weights are left uninitialised for a checkpoint load."""
    from mtf_train.train.model import BloomModel

    model = BloomModel(tiny_config(perform_initialization=init))
    for name, p in model.named_parameters():
        dim = hf_names.tp_partition_dim(name)
        assert getattr(p, "tensor_model_parallel", False) == (dim is not None), name
        if dim is not None:
            assert p.partition_dim == dim, name


def test_hf_names_round_trip_and_tp_split_merge(tp1):
    config = tiny_config(num_layers=2)
    state = _model(config).state_dict()
    hf = hf_names.to_hf_state_dict(state, 2)
    assert "ln_f.weight" in hf and "word_embeddings_layernorm.bias" in hf and "h.1.mlp.dense_4h_to_h.weight" in hf
    assert hf_names.from_hf_state_dict(hf, 2).keys() == state.keys()
    shards = [hf_names.split_tp(state, 2, r) for r in range(2)]
    assert shards[0]["3.self_attention.dense.weight"].shape == (64, 32)  # row parallel: dim 1
    assert shards[0]["3.self_attention.query_key_value.weight"].shape == (96, 64)  # 2 whole heads of [3, 16]
    assert shards[0]["tied_modules.embed.word_embeddings.weight"].shape == (128, 64)
    assert shards[0]["3.self_attention.dense.bias"].shape == (64,)  # replicated
    merged = hf_names.merge_tp(shards)
    assert all(torch.equal(merged[k], state[k]) for k in state)


# --- initialisation -----------------------------------------------------------------------------------------


def test_init_std_and_determinism(tp1):
    from mtf_train.train.model import BloomModel

    config = tiny_config(num_layers=4, hidden_size=128, init_std=0.05)
    model = BloomModel(config)
    params = dict(model.named_parameters())
    scaled = 0.05 / math.sqrt(2 * 4)
    for name, p in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name or ".norm." in name or name == "8.weight":
            assert torch.all(p == 1), name
        else:
            expected = scaled if re.search(r"(self_attention\.dense|dense_4h_to_h)\.weight$", name) else 0.05
            assert p.std().item() == pytest.approx(expected, rel=0.05), name
    # Per-layer seeds: a second build gives the same weights, whatever the global RNG did in between.
    torch.manual_seed(12345)
    again = BloomModel(config)
    assert all(torch.equal(p, again.state_dict()[n]) for n, p in model.state_dict().items())


# --- activation checkpointing -------------------------------------------------------------------------------


def test_activation_checkpointing_same_loss_and_grads_with_dropout(tp1):
    """Recomputation must replay both dropout streams (hidden: default RNG; attention: the model-parallel
    tracker), or the gradients differ from the non-checkpointed run."""
    from mtf_train.train import parallel

    base = tiny_config(hidden_dropout=0.1, attention_dropout=0.1)
    ids, seg, is_input = packed_rows()
    tokens, labels, mask, seg_t = prepare_batch(ids, seg, is_input)
    results = []
    for ckpt in (False, True):
        model = _model(dataclasses.replace(base, checkpoint_activations=ckpt)).train()
        parallel.seed_everything(7, tp1)
        loss = model(tokens, seg_t, labels, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0.item() == pytest.approx(loss1.item(), abs=1e-6)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=0)
    # Dropout really was on: an eval-mode loss differs.
    with torch.no_grad():
        assert abs(_model(base).eval()(tokens, seg_t, labels, mask).item() - loss0.item()) > 1e-4


def test_mask_cache_sees_new_and_refilled_segment_ids():
    """Blocks share one mask per segment-id tensor; a new tensor or one refilled in place gets a new mask."""
    seg = torch.tensor([[1, 1, 2, 2]])
    first = attn._cached_mask(seg)
    assert attn._cached_mask(seg) is first
    seg.copy_(torch.tensor([[1, 1, 1, 1]]))  # same object, new content
    assert torch.equal(attn._cached_mask(seg), attn.packed_causal_mask(seg))
    other = torch.tensor([[1, 2, 2, 2]])
    assert torch.equal(attn._cached_mask(other), attn.packed_causal_mask(other))
