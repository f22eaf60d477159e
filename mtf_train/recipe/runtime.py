"""The trainer a recipe runs (`runtime.kind`), chosen once: what each one can do is asked of this object, so that
plan, validation and rendering name a capability instead of comparing the kind's name.

- `mtf_train`: the built-in trainer, `python -m mtf_train.train`, on current DeepSpeed.
- `megatron_deepspeed`: an external Megatron-DeepSpeed checkout (finetune_t0.py), the 2022 stack.
"""
from __future__ import annotations

from pathlib import Path

from mtf_train.recipe.schema import Recipe


class Runtime:
    kind = ""
    # bf16 runs as ZeRO-1 with fp32 gradient accumulation: current DeepSpeed's BF16_Optimizer resumes only so.
    bf16_as_zero1 = False
    # Attention through FlexAttention on GPUs (without attention dropout), which changes the FLOPs counted.
    has_flex_attention = False
    # The recompute mode `auto` stands for; None: the least recomputation whose peak fits the GPU.
    auto_recompute: str | None = None
    auto_recompute_why = ""

    def __init__(self, r: Recipe):
        self.r = r

    def program(self) -> list[str]:
        """What the launcher runs, before the trainer's arguments."""
        raise NotImplementedError

    def standalone_launcher(self, python: str, nproc: int) -> list[str]:
        """What starts `nproc` ranks of `program()` on one machine without SLURM."""
        return [python, "-u", "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                "--nnodes", "1", "--max_restarts", "0", "--tee", "3"]

    def refusals(self) -> list[tuple[str, str]]:
        """(field, reason) for each recipe setting this trainer does not have: refused rather than ignored."""
        return []

    def own_args(self, recompute: str) -> list[str]:
        """Arguments only this trainer reads (after the shared finetune_t0 recompute flag)."""
        return []

    def loader_args(self) -> list[str]:
        """Data-loader arguments only this trainer reads."""
        return []


class BuiltinRuntime(Runtime):
    kind = "mtf_train"
    bf16_as_zero1 = True

    @property
    def has_flex_attention(self) -> bool:  # type: ignore[override]
        return self.r.cluster.accelerator == "gpu" and self.r.model.attention_dropout == 0

    def program(self) -> list[str]:
        return ["-m", "mtf_train.train"]

    def standalone_launcher(self, python: str, nproc: int) -> list[str]:
        # mtf_train.ranks: on a CPU machine the ranks share one import of torch, DeepSpeed and megatron-core
        return [python, "-u", "-m", "mtf_train.ranks", "--nproc_per_node", str(nproc)]

    def refusals(self) -> list[tuple[str, str]]:
        m, r = self.r.model, self.r
        out = []
        if not m.embed_layernorm:
            out.append(("model.embed_layernorm", "false is not supported by the built-in trainer (its BLOOM always "
                        "has the embedding layer norm); use runtime.kind megatron_deepspeed for it"))
        if not r.parallel.sync_tp_duplicated_parameters:
            out.append(("parallel.sync_tp_duplicated_parameters", "false is not supported by the built-in trainer: "
                        "its tensor-parallel replicas of layer norms and row-parallel biases get identical gradients "
                        "and stay equal"))
        if r.data.dataloader_type != "single":
            out.append(("data.dataloader_type", f"{r.data.dataloader_type} is not supported by the built-in trainer: "
                        "it reads Megatron's single order, which makes resumes exact"))
        if m.position_embedding_type != "alibi":
            out.append(("model.position_embedding_type", "packed MTF rows need alibi: absolute positions are not "
                        "reset per packed example"))
        return out

    def own_args(self, recompute: str) -> list[str]:
        a = ["--recompute", recompute]
        if self.r.training.compile is not None:
            a.append("--compile" if self.r.training.compile else "--no-compile")
        return a

    def loader_args(self) -> list[str]:
        return ["--num-workers", str(self.r.data.num_workers)]


class MegatronDeepSpeedRuntime(Runtime):
    kind = "megatron_deepspeed"
    auto_recompute = "full"
    auto_recompute_why = "auto with runtime megatron_deepspeed: the 2022 setting (--checkpoint-activations)"

    def program(self) -> list[str]:
        return [str(Path(self.r.runtime.megatron_deepspeed_dir) / self.r.runtime.entrypoint)]

    def refusals(self) -> list[tuple[str, str]]:
        r, p = self.r, self.r.precision
        out = []
        if p.dtype == "bf16" and p.zero_stage != 0:
            out.append(("precision.zero_stage", "the Megatron-DeepSpeed runtime runs bf16 with its own stage-1-like "
                        "BF16_Optimizer and needs zero_stage 0"))
        if r.runtime.megatron_deepspeed_dir is None:
            out.append(("runtime.megatron_deepspeed_dir", "required with runtime.kind megatron_deepspeed"))
        if r.cluster.accelerator == "cpu":
            out.append(("cluster.accelerator", "the Megatron-DeepSpeed runtime needs GPUs (fused CUDA kernels)"))
        if r.training.recompute == "selective":
            out.append(("training.recompute", "selective recomputation is the built-in trainer's; the "
                        "Megatron-DeepSpeed runtime has only none or full (--checkpoint-activations)"))
        if r.training.compile is not None:
            out.append(("training.compile", "block compilation is the built-in trainer's; leave it unset with the "
                        "Megatron-DeepSpeed runtime"))
        return out


RUNTIMES = {cls.kind: cls for cls in (BuiltinRuntime, MegatronDeepSpeedRuntime)}


def runtime(r: Recipe) -> Runtime:
    """The recipe's trainer runtime."""
    return RUNTIMES[r.runtime.kind](r)
