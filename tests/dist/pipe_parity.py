"""`python -m mtf_train.ranks --nproc_per_node TP*PP*DP -m pipe_parity TP PP OUT [universal]`:
DeepSpeed's pipeline engine (`train_batch`, 1F1B, 2 micro batches per
DP rank) over `BloomPipeline` at TP x PP x DP gives the same losses for two optimizer steps as the plain TP=1
model trained by hand with the same weights and SGD on all DP ranks' batches (DP = world / (TP*PP), each
DP rank feeding its own micro batches). Also checks the layer partition, the layer-file names and that
`MegatronMPU` agrees with DeepSpeed's pipeline grid. With a 4th argument `universal`, also trains one
ZeRO-1 Adam step, saves, and converts the checkpoint with DeepSpeed's ds_to_universal in strict mode (every
`universal_checkpoint_info` pattern must be used), then compares the merged parameters with our TP merge rules.
Usage: pipe_parity.py TP PP OUT.json [universal]"""
from __future__ import annotations

import argparse
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from bloom_tiny import micro_batches, perturb_, tiny_config
from mtf_train.train import hf_names, parallel
from mtf_train.train.model import BloomModel, BloomPipeline

ATOL = 1e-5
LR = 0.05
STEPS = 2
MICRO = 2


def rank_batches(batches, dp: int, dp_rank: int) -> list:
    """Step s, micro batch m of DP rank d is batches[(s * dp + d) * MICRO + m]."""
    return [batches[(s * dp + dp_rank) * MICRO + m] for s in range(STEPS) for m in range(MICRO)]


def reference_losses(config, batches, dp: int, state_out: dict) -> list[float]:
    """Plain model, SGD on the mean of all micro-batch losses of a step over all DP ranks: what gradient
    accumulation (1/MICRO) and DP gradient averaging (1/DP) optimise."""
    model = BloomModel(config, norm_target_loss=True)
    perturb_(model)
    state_out.update({k: v.clone() for k, v in model.state_dict().items()})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for (tokens, seg), (labels, mask, _) in batches[step * dp * MICRO:(step + 1) * dp * MICRO]:
            loss = model(tokens, seg, labels, mask) / (MICRO * dp)
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses


def universal_check(config, state, full_state, batches, out_dir) -> dict:
    """ZeRO-1 + Adam pipeline step -> checkpoint -> ds_to_universal (strict) -> compare with merge_tp."""
    pipe = BloomPipeline(config, parallel.pipe_topology(state))
    shard = hf_names.split_tp(full_state, state.tp, state.tp_rank)
    pipe.load_state_dict({k: shard[k] for k in pipe.state_dict()}, strict=True)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe,
        model_parameters=[p for p in pipe.parameters() if p.requires_grad],
        config={
            "train_micro_batch_size_per_gpu": batches[0][0][0].shape[0],
            "gradient_accumulation_steps": MICRO,
            "steps_per_print": 10**9,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 1},
        },
    )
    engine.train_batch(data_iter=iter(batches[:MICRO]))
    ckpt = os.path.join(out_dir, "universal_src")
    engine.save_checkpoint(ckpt, tag="global_step1")
    local = {k: v.detach().clone() for k, v in pipe.state_dict().items()}
    everything = [None] * state.world_size
    dist.all_gather_object(everything, (state.pp_rank, state.tp_rank, local) if state.dp_rank == 0 else None)
    everything = [e for e in everything if e is not None]  # DP replicas hold the same weights
    result = {}
    if state.rank == 0:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        out = os.path.join(out_dir, "universal")
        ds_to_universal(argparse.Namespace(
            input_folder=os.path.join(ckpt, "global_step1"), output_folder=out, num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
        diffs, first_stage = {}, {}
        for name in hf_names.expected_module_names(config.num_layers):
            owner = min(pp for pp, _, sd in everything if name in sd)  # tied embedding: stage 0's copy
            shards = [sd[name] for pp, _, sd in sorted(everything, key=lambda e: e[1]) if pp == owner]
            expected = hf_names.merge_tp([{name: s} for s in shards])[name]
            if name == "tied_modules.embed.word_embeddings.weight":
                expected = expected[: config.original_vocab_size]  # padding rows stripped
            got = torch.load(os.path.join(out, "zero", name, "fp32.pt"), weights_only=False)["param"]
            diffs[name] = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
            first_stage[name] = owner
        norm = "tied_modules.embed.word_embeddings.norm.weight"
        by_stage = {pp: sd[norm] for pp, tp_rank, sd in everything if tp_rank == 0}
        result = {
            "max_diff": max(diffs.values()),
            "worst": max(diffs, key=diffs.get),
            # The last stage's copy of the embedding norm is never trained, so it differs from stage 0's
            # after the step; max_diff == 0 then shows the converter took stage 0's.
            "stale_norm_differs": not torch.equal(by_stage[0], by_stage[state.pp - 1]),
        }
    holder = [result]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check(tp: int, pp: int, out_path: str, universal: bool = False) -> None:
    config = tiny_config(num_layers=4, checkpoint_activations=True)
    dp = int(os.environ["WORLD_SIZE"]) // (tp * pp)
    batches = micro_batches(STEPS * MICRO * dp)

    parallel.init_parallel(tp=1, pp=1)
    full_state: dict = {}
    ref = reference_losses(config, batches, dp, full_state)

    parallel.destroy_parallel()
    state = parallel.init_parallel(tp=tp, pp=pp)
    pipe = BloomPipeline(config, parallel.pipe_topology(state))
    shard = hf_names.split_tp(full_state, tp, state.tp_rank)
    local = pipe.state_dict()
    # Same parameter names as the plain model: load this stage's part of the (sharded) full state.
    pipe.load_state_dict({k: shard[k] for k in local}, strict=True)

    engine, _, _, _ = deepspeed.initialize(
        model=pipe,
        optimizer=torch.optim.SGD(pipe.parameters(), lr=LR),
        config={
            "train_micro_batch_size_per_gpu": batches[0][0][0].shape[0],
            "gradient_accumulation_steps": MICRO,
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": 0},
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 by default
            "wall_clock_breakdown": False,
        },
    )
    it = iter(rank_batches(batches, dp, state.dp_rank))
    losses = [engine.train_batch(data_iter=it).item() for _ in range(STEPS)]

    grid = pipe.mpu()
    mpu = parallel.MegatronMPU()
    mpu_checks = {
        "tp": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size())
        == (grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size()),
        "pp": (mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size())
        == (grid.get_pipe_parallel_rank(), grid.get_pipe_parallel_world_size()),
        "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group_ranks())
        == (grid.get_data_parallel_rank(), grid.get_data_parallel_world_size(), grid.get_data_parallel_group_ranks()),
        "mp": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size())
        == (grid.get_model_parallel_rank(), grid.get_model_parallel_world_size()),
    }

    # Layer files as DeepSpeed writes them (model axis in the name, no _extra_state, bigscience's layer numbering).
    save_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), f"ckpt_tp{tp}_pp{pp}")
    engine.save_checkpoint(save_dir, tag="global_step2")
    dist.barrier()
    step_dir = os.path.join(save_dir, "global_step2")
    files = sorted(os.listdir(step_dir))
    layer_files = {
        f: sorted(torch.load(os.path.join(step_dir, f), weights_only=True)) for f in files if f.startswith("layer_")
    }

    report = {
        "rank": state.rank,
        "coords": [state.pp_rank, state.dp_rank, state.tp_rank],
        "parts": [int(p) for p in pipe.parts],
        "losses": losses,
        "ref_losses": ref,
        "max_diff": max(abs(a - b) for a, b in zip(losses, ref)),
        "mpu": mpu_checks,
        "files": files,
        "layer_files": layer_files,
    }
    report["ok"] = report["max_diff"] < ATOL and all(mpu_checks.values())
    if universal:
        report["universal"] = universal_check(config, state, full_state, rank_batches(batches, dp, state.dp_rank),
                                              os.path.dirname(os.path.abspath(out_path)))
        report["ok"] = report["ok"] and report["universal"]["max_diff"] == 0.0
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, report)
    if state.rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    print(json.dumps({k: report[k] for k in ("rank", "parts", "losses", "ref_losses", "mpu", "ok")}), flush=True)
    dist.barrier()
    sys.exit(0 if all(r["ok"] for r in gathered) else 1)


def main(argv: list[str]) -> None:  # as mtf_train.ranks calls it
    check(int(argv[0]), int(argv[1]), argv[2], universal=argv[3:] == ["universal"])


if __name__ == "__main__":
    main(sys.argv[1:])
