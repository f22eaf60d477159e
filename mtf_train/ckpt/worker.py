"""`python -m mtf_train.ckpt.worker SPEC.json`, one process per rank (started by mtf_train.ranks): the real model at
one shape.

Builds BLOOM with the trainer's own `build_engine` (megatron-core TP layers in DeepSpeed's PipelineModule, the
trainer's optimizer grouping, a DeepSpeed engine), then, by `spec["mode"]`:
- `probe`:  load an ordinary checkpoint (or a universal one with `universal`) and measure;
- `resave`: load, save an ordinary checkpoint at this shape into `save` (client state from `client`),
            load that back, and measure;
- `import`: copy a transformers BLOOM folder's weights into the model, save into `save` (iteration 0, fresh
            optimizer), load that back, and measure.
Measuring (see `verify.py`): logits of the fixed batch's first row, loss of the fixed batch, one training step
at `step_lr` on it, loss and logits again. Rank 0 writes the results to `spec["result"]`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# What mtf_train.ranks imports once before it forks the ranks (see main).
PRELOAD = ("mtf_train.ckpt.verify", "mtf_train.train.checkpoint", "mtf_train.train.engine", "mtf_train.train.feed",
           "mtf_train.train.model", "torch._dynamo")


def load_hf_weights(model, hf_dir: str, num_layers: int, padded_vocab: int, tp: int, tp_rank: int) -> None:
    """This stage's parameters from a transformers BLOOM folder (safetensors), split for `tp_rank`."""
    import torch
    from safetensors import safe_open

    from mtf_train.train import hf_names

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = f
    with torch.no_grad():
        for name, param in model.named_parameters():
            hf = hf_names.to_hf_name(name, num_layers)
            key = hf if hf in where else "transformer." + hf
            if key not in where:
                raise KeyError(f"{hf_dir}: no tensor {hf}")
            with safe_open(str(where[key]), framework="pt") as fh:
                full = fh.get_tensor(key)
            if hf == "word_embeddings.weight" and full.shape[0] < padded_vocab:
                full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], full.shape[1])])
            shard = hf_names.split_tp({name: full}, tp, tp_rank)[name]
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF shard {tuple(shard.shape)} vs model {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))


def main(argv: list[str]) -> int:
    (spec_path,) = argv
    import torch
    import torch.distributed as dist

    from mtf_train.ckpt.verify import fixed_batch
    from mtf_train.train import checkpoint as trainer_ckpt
    from mtf_train.train.engine import EngineConfig, OptimizerConfig, build_engine
    from mtf_train.train.feed import to_pipe_batch
    from mtf_train.train.model import BloomModelConfig, gather_logits

    spec = json.loads(Path(spec_path).read_text())
    m, o, rows = spec["model"], spec["optimizer"], spec["batch"]["rows"]
    seed = spec.get("seed", 1234)
    config = BloomModelConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_heads=m["num_heads"],
        padded_vocab_size=m["padded_vocab_size"], original_vocab_size=m.get("original_vocab_size"),
        layernorm_epsilon=m.get("layernorm_epsilon", 1e-5), init_std=m.get("init_std", 0.02),
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, attention="auto", init_seed=seed)
    # The saved DeepSpeed config (ZeRO stage, precision), with a batch of the fixed rows, one per micro batch.
    ds_config = dict(spec["ds_config"])
    ds_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=rows, steps_per_print=10**9,
                     wall_clock_breakdown=False)
    ds_config.pop("gradient_accumulation_steps", None)
    engine_config = EngineConfig(
        tp=spec["tp"], pp=spec["pp"], seed=seed, model=config,
        optimizer=OptimizerConfig(lr=o["lr"], weight_decay=o["weight_decay"], beta1=o["beta1"], beta2=o["beta2"],
                                  eps=o["eps"]),
        ds_config=ds_config, norm_target_loss=spec.get("norm_target_loss", False),
        partition_method=spec.get("partition_method", "type:transformer|embedding"),
        universal=bool(spec.get("universal")), backend=spec.get("backend"))

    def hf_weights(model, state):
        load_hf_weights(model, spec["hf_dir"], config.num_layers, config.padded_vocab_size, state.tp, state.tp_rank)

    engine, state = build_engine(engine_config, fill_weights=hf_weights if spec["mode"] == "import" else None)
    optimizer = engine.optimizer

    from mtf_train.ckpt.safe import guard_torch_load
    from mtf_train.ckpt.safe import load as safe_load

    def load(folder: str, tag: str):
        module_only = bool(spec.get("load_module_only"))
        with guard_torch_load(check=False):  # weights only, allowlisted (the tool checked the files' CRCs)
            path, client = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=not module_only,
                                                  load_lr_scheduler_states=False, load_module_only=module_only)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}/{tag}")
        return client or {}

    client = {}
    if spec.get("load"):
        client = load(spec["load"], spec["tag"])
    if spec["mode"] in ("resave", "import"):
        if spec.get("universal"):  # from here on the engine loads and saves ordinary checkpoints
            engine._config.load_universal_checkpoint = False
        saved = safe_load(spec["client"]) if spec.get("client") else {}
        saved = dict(saved)
        saved["rng_state"] = trainer_ckpt.rng_state()
        tag = spec.get("save_tag", spec["tag"])
        trainer_ckpt.save_step(engine, spec["save"], tag, saved)
        client = load(spec["save"], tag)

    # --- measure on the fixed batch ---
    b = spec["batch"]
    ids, segs, is_input = fixed_batch(rows, b["seq"], b["vocab"], b.get("seed", 1234),
                                      single_segment=b.get("single_segment", False))
    mine = [to_pipe_batch((ids[i:i + 1], segs[i:i + 1], is_input[i:i + 1]), state.device)
            for i in range(state.dp_rank, rows, state.dp)]
    first = [to_pipe_batch((ids[:1], segs[:1], is_input[:1]), state.device)]
    last_tp0 = state.is_last_stage and state.dp_rank == 0 and state.tp_rank == 0

    def logits():
        engine.total_loss = None  # DeepSpeed keeps it across eval_batch calls; logits and losses differ in shape
        _, out = engine.eval_batch(iter(first), return_logits=True, compute_loss=False, num_micro_batches=1)
        if state.is_last_stage:
            # The pipeline ends in final hidden states (the LM head runs inside the loss): apply the head here.
            with torch.no_grad():
                full = gather_logits(engine.module.lm_head().lm_logits(out).float())
            return full.cpu() if last_tp0 else None
        return None

    results = {"shape": [state.tp, state.pp, state.dp], "iteration": client.get("iteration")}
    logits0 = logits()
    engine.total_loss = None
    results["loss0"] = float(engine.eval_batch(iter(mine)))
    if spec.get("steps", True):
        for group in optimizer.param_groups:
            group["lr"] = spec["step_lr"]
        engine.train()
        engine.total_loss = None
        results["step_loss"] = float(engine.train_batch(data_iter=iter(mine)))
        engine.total_loss = None
        results["loss1"] = float(engine.eval_batch(iter(mine)))
        logits1 = logits()
    else:
        logits1 = None
    # The last stage's (dp 0, tp 0) rank holds the gathered logits: it writes them next to the results.
    if last_tp0:
        torch.save({"logits0": logits0, "logits1": logits1}, spec["result"] + ".logits")
    dist.barrier()
    if dist.get_rank() == 0:
        got = torch.load(spec["result"] + ".logits", weights_only=True)
        results.update(got)
        Path(spec["result"] + ".logits").unlink()
        torch.save(results, spec["result"] + ".tmp")
        Path(spec["result"] + ".tmp").replace(spec["result"])
    dist.barrier()
    return 0


if __name__ == "__main__":
    from mtf_train.process import exit_now

    exit_now(main(sys.argv[1:]))
