"""The plan: everything derived from a recipe before a job is submitted.

Parameter counts, memory per GPU, FLOPs and time, on the recipe's shape (recipe/shape.py; its arithmetic and the
FLOPs formula are rules.py's). Formulas:
Narayanan et al. 2021 (arXiv:2104.04473) for FLOPs, Korthikanti et al. 2022 (arXiv:2205.05198) for activation memory.
Pure Python: the CLI's plan path must not import torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mtf_train.recipe.runtime import runtime
from mtf_train.recipe.schema import Recipe
from mtf_train.recipe.shape import Shape, derive_shape  # noqa: F401 (plan.Shape, plan.derive_shape: render, launch)
from mtf_train.rules import flops_per_token, loss_chunk_rows

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class StageMemory:
    stage: int
    blocks: int
    embedding: bool
    final_norm: bool
    parameters: int          # per GPU of this stage (after tensor parallelism)
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float


@dataclass
class Plan:
    recipe: str
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch: int
    global_batch: int
    gradient_accumulation: int
    layers_per_stage: list[int]
    padded_vocab: int
    seq_length: int
    tokens_per_step: int
    train_iters: int
    train_samples: int
    parameters: int
    parameters_per_stage: list[int]
    precision: str
    zero_stage: int
    memory: list[StageMemory]
    peak_memory_gb: float
    peak_memory_stage: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    flops_formula: str
    tflops_per_gpu: float
    step_seconds: float
    total_hours: float
    total_gpu_hours: float
    exit_duration_in_mins: float | None
    notes: list[str] = field(default_factory=list)
    recompute: str = "none"          # the resolved mode the trainer runs with (--recompute)
    recompute_reason: str = ""
    attention: str = "reference"     # the attention path the memory model counts: flex or reference

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# --- activation memory ------------------------------------------------------------------------------------
# What the built-in trainer's block really keeps for backward, per micro batch, counted tensor by tensor from
# model.py / attention.py as eager autograd saves them (tests/test_plan_memory.py measures the saved tensors
# of a real block against these numbers). In units of s*b*h elements of the activation dtype (e bytes),
# t = tensor-parallel degree, a = heads:
#   none, reference attention: LN1 input, LN1 output, LN2 input, LN2 output (4); q, k, v copies for the
#     batched matmuls and the context copy into the output projection (4/t); GeLU input and output (8/t);
#     plus the float32 softmax output a/t*s*s*b*4 bytes (+ its 16-bit copy for probs @ V when e < 4).
#   none, FlexAttention (GPU default): the same without any s*s tensor: q, k, v are views of the fused QKV
#     output (3/t), the kernel's output (1/t) and its float32 log-sum-exp (a/t*s*b*4 bytes), the context copy (1/t).
#   selective: the block input (1), the GEMM outputs: QKV (3/t), h->4h (4/t), both row-parallel outputs (2),
#     and at t > 1 their all-reduced copies (2); with FlexAttention also its output and log-sum-exp.
#   full: the block input (1).
#   Under none both layer norms also keep a float32 mean and rstd per token (16*s*b bytes).
# A block being recomputed in backward holds, for that moment, the difference to `none` once per stage.
# torch.compile's partitioner may keep less than eager (it recomputes cheap pointwise ops), never more.

# The LM head's loss chunks: rules.loss_chunk_rows, shared with train/loss.py.
# auto recomputation keeps this share of GPU memory free (CUDA context, NCCL buffers, allocator fragmentation).
MEMORY_HEADROOM = 0.10


def block_activation_bytes(mode: str, s: int, b: int, h: int, a: int, tp: int, e: int, flex: bool) -> float:
    """Bytes one transformer block keeps for backward per micro batch (see the table above)."""
    sbh = s * b * h
    ln_stats = 16 * s * b
    if mode == "full":
        return sbh * e
    if mode == "selective":
        kept = (1 + 7 / tp + 2 + (2 if tp > 1 else 0)) * sbh * e
        if flex:
            kept += sbh / tp * e + 4 * a / tp * s * b
        return kept
    if mode != "none":
        raise ValueError(f"unknown recompute mode {mode!r}")
    if flex:
        attention = 5 / tp * sbh * e + 4 * a / tp * s * b
    else:
        attention = 4 / tp * sbh * e + a / tp * s * s * b * (4 + (e if e < 4 else 0))
    return (4 + 8 / tp) * sbh * e + attention + ln_stats


def head_activation_bytes(s: int, b: int, h: int, vocab: int, tp: int, e: int) -> float:
    """The last stage's LM head and loss: the final layer norm's input and output (2 s*b*h), and, computing the
    loss a chunk of rows at a time, one chunk's float32 logits and their gradient, never the full logits; with
    16-bit weights also the float32 sum of the chunks' weight gradients."""
    rows = min(loss_chunk_rows(vocab // tp), s * b)
    chunk = 2 * rows * (vocab // tp) * 4
    wgrad = (vocab // tp) * h * 4 if e < 4 else 0
    return 2 * s * b * h * e + chunk + wgrad


def stage_layout(num_layers: int, pp: int, method: str) -> list[tuple[int, bool, bool]]:
    """(blocks, holds embedding, holds final norm + tied head) per pipeline stage.

    Mirrors DeepSpeed's partitioning of the GPTModelPipe layer list: the tied embedding opens the first
    stage and closes the last one; `type:transformer|embedding` counts both as a unit like a block.
    """
    if pp == 1:
        return [(num_layers, True, True)]
    if method == "type:transformer|embedding":
        units = _balanced(num_layers + 2, pp)
        blocks = [u for u in units]
        blocks[0] -= 1
        blocks[-1] -= 1
    else:
        blocks = _balanced(num_layers, pp)
    return [(b, i == 0, i == pp - 1) for i, b in enumerate(blocks)]


def _balanced(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def uses_flex_attention(r: Recipe) -> bool:
    """The built-in trainer's attention on this cluster: FlexAttention on GPUs without attention dropout."""
    return runtime(r).has_flex_attention


def requested_recompute(r: Recipe) -> str:
    """training.recompute, with finetune_t0's checkpoint_activations switch read for older recipes."""
    t = r.training
    if t.recompute == "auto" and t.checkpoint_activations is not None:
        return "full" if t.checkpoint_activations else "none"
    return t.recompute


def stage_memory(r: Recipe, shape: Shape, mode: str) -> list[StageMemory]:
    """Memory per GPU of every pipeline stage with recompute `mode`."""
    m = r.model
    h, L, a, s, V = m.hidden_size, m.num_layers, m.num_attention_heads, m.seq_length, shape.padded_vocab
    tp, pp, dp, b = shape.tp, shape.pp, shape.dp, shape.micro
    dtype = r.precision.dtype
    wbytes = DTYPE_BYTES[dtype]
    # Gradients: fp32 accumulation for bf16 (BF16_Optimizer), in the weights' dtype otherwise.
    gbytes = 4 if dtype == "bf16" else wbytes
    # Optimizer: fp32 master copy (16-bit training only) + Adam's two moments, sharded over dp by ZeRO-1
    # and by the 2022 BF16_Optimizer alike.
    obytes = (4 if dtype != "fp32" else 0) + 8
    sharded = shape.zero_stage >= 1 or dtype == "bf16"
    e = wbytes  # activations are in the training dtype
    flex = uses_flex_attention(r)
    per_block = block_activation_bytes(mode, s, b, h, a, tp, e, flex)
    # While one block is recomputed in backward it holds what `none` keeps, on top of what its mode keeps.
    recompute_peak = block_activation_bytes("none", s, b, h, a, tp, e, flex) - per_block
    # The reference attention's boolean mask [b, s, s], one per micro batch in flight, shared by its blocks.
    mask = 0 if flex else s * s * b
    memory = []
    for i, (blocks, has_emb, has_head) in enumerate(stage_layout(L, pp, r.parallel.partition_method)):
        params = blocks * (12 * h * h // tp + 7 * h // tp + 6 * h)  # row-parallel biases and norms replicated
        if has_emb or has_head:
            params += V * h // tp + 2 * h
        if has_head:
            params += 2 * h
        # 1F1B keeps up to (pp - stage) micro batches in flight on stage `stage`.
        in_flight = min(pp - i, shape.grad_accum or 1)
        act = in_flight * (blocks * per_block + (mask if blocks else 0))
        if blocks:
            act += recompute_peak
        if has_emb:  # the embedding layer norm's input
            act += in_flight * s * b * h * e
        if has_head:
            act += head_activation_bytes(s, b, h, V, tp, e)
        gb = 1024 ** 3
        w, g = params * wbytes / gb, params * gbytes / gb
        o = params * obytes / (dp if sharded else 1) / gb
        act_gb = act / gb
        memory.append(StageMemory(i, blocks, has_emb, has_head, params, round(w, 3), round(g, 3), round(o, 3),
                                  round(act_gb, 3), round(w + g + o + act_gb, 3)))
    return memory


def choose_recompute(r: Recipe, shape: Shape) -> tuple[str, str]:
    """(mode, why): the recipe's mode, or for auto the least recomputation whose peak fits the GPU."""
    asked = requested_recompute(r)
    if asked != "auto":
        return asked, "set by the recipe"
    rt = runtime(r)
    if rt.auto_recompute:
        return rt.auto_recompute, rt.auto_recompute_why
    budget = r.cluster.gpu_memory_gb * (1 - MEMORY_HEADROOM)
    peaks = {}
    for mode in RECOMPUTE_ORDER:
        peaks[mode] = max(sm.total_gb for sm in stage_memory(r, shape, mode))
        if peaks[mode] <= budget:
            tried = ", ".join(f"{k} {v:.1f} GB" for k, v in peaks.items())
            return mode, (f"auto: least recomputation that fits {budget:.1f} GB ({1 - MEMORY_HEADROOM:.0%} of "
                          f"cluster.gpu_memory_gb {r.cluster.gpu_memory_gb:g}); peak {tried}")
    tried = ", ".join(f"{k} {v:.1f} GB" for k, v in peaks.items())
    return "full", f"auto: nothing fits {budget:.1f} GB, full keeps least; peak {tried}"


RECOMPUTE_ORDER = ("none", "selective", "full")  # least recomputation first


def build_plan(r: Recipe, shape: Shape) -> Plan:
    """Estimates for a validated recipe (see mtf_train.recipe.validate)."""
    m = r.model
    h, L, s, V = m.hidden_size, m.num_layers, m.seq_length, shape.padded_vocab
    tp, pp, dp, b = shape.tp, shape.pp, shape.dp, shape.micro
    block_params = 12 * h * h + 13 * h
    embed_params = V * h + 2 * h
    total = embed_params + L * block_params + 2 * h

    notes = []
    dtype = r.precision.dtype
    recompute, why = choose_recompute(r, shape)
    flex = uses_flex_attention(r)
    memory = stage_memory(r, shape, recompute)
    peak = max(memory, key=lambda sm: sm.total_gb)

    model_fpt = flops_per_token(L, h, s, V, recompute="none")
    hw_fpt = flops_per_token(L, h, s, V, recompute=recompute, flex=flex)
    tokens_per_step = shape.global_batch * s
    step_s = hw_fpt * tokens_per_step / (shape.world_size * r.cluster.tflops_per_gpu * 1e12)
    total_s = step_s * shape.train_iters
    if runtime(r).bf16_as_zero1 and dtype == "bf16" and r.precision.zero_stage == 0:
        notes.append("precision.zero_stage 0 with bf16 is run as ZeRO-1 with fp32 gradient accumulation: current "
                     "DeepSpeed cannot resume a ZeRO-0 bf16 pipeline checkpoint; the optimizer (BF16_Optimizer, "
                     "sharded fp32 states) and the numbers are the same as in 2022")
    if peak.total_gb > r.cluster.gpu_memory_gb:
        notes.append(f"estimated peak memory {peak.total_gb:.1f} GB on stage {peak.stage} exceeds "
                     f"cluster.gpu_memory_gb {r.cluster.gpu_memory_gb:g}")
    formula = {"full": "96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) per step",
               "none": "72*B*s*l*h^2*(1 + s/(6h)) + 6*B*s*h*V per step",
               "selective": "72*B*s*l*h^2*(1 + s/(6h)) + 6*B*s*h*V + " + ("0 (FlexAttention's output is kept)"
                                                                         if flex else "4*B*s^2*l*h") + " per step"}
    return Plan(
        recipe=r.name or "", world_size=shape.world_size, tensor_parallel=tp, pipeline_parallel=pp,
        data_parallel=dp, micro_batch=b, global_batch=shape.global_batch,
        gradient_accumulation=shape.grad_accum, layers_per_stage=[sm.blocks for sm in memory],
        padded_vocab=V, seq_length=s, tokens_per_step=tokens_per_step, train_iters=shape.train_iters,
        train_samples=shape.train_samples, parameters=total, parameters_per_stage=[sm.parameters for sm in memory],
        precision=dtype, zero_stage=shape.zero_stage, memory=memory, peak_memory_gb=peak.total_gb,
        peak_memory_stage=peak.stage, model_flops_per_token=model_fpt, hardware_flops_per_token=hw_fpt,
        flops_formula=f"{formula[recompute]} (model FLOPs: as with recompute none)",
        tflops_per_gpu=r.cluster.tflops_per_gpu, step_seconds=step_s, total_hours=total_s / 3600,
        total_gpu_hours=total_s / 3600 * shape.world_size, exit_duration_in_mins=shape.exit_minutes, notes=notes,
        recompute=recompute, recompute_reason=why, attention="flex" if flex else "reference")


def format_plan(p: Plan) -> str:
    def n(x: float) -> str:
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(x) >= div:
                return f"{x / div:.2f}{unit}"
        return f"{x:g}"

    lines = [
        f"plan for {p.recipe}",
        f"  shape        world {p.world_size} = pp {p.pipeline_parallel} x tp {p.tensor_parallel} x dp {p.data_parallel}",
        f"  batch        micro {p.micro_batch} x dp {p.data_parallel} x accumulation {p.gradient_accumulation}"
        f" = global {p.global_batch} samples, {n(p.tokens_per_step)} tokens/step",
        f"  length       {p.train_iters} steps, {p.train_samples:,} samples",
        f"  stages       blocks per stage {_compact(p.layers_per_stage)}",
        f"  parameters   {n(p.parameters)} total; per GPU by stage {_compact([n(x) for x in p.parameters_per_stage])}"
        f"; vocab padded to {p.padded_vocab}",
        f"  memory/GPU   peak {p.peak_memory_gb:.1f} GB on stage {p.peak_memory_stage} ({p.precision}, ZeRO-{p.zero_stage})",
    ]
    peak = p.memory[p.peak_memory_stage]
    lines.append(f"               weights {peak.weights_gb:.1f} + grads {peak.gradients_gb:.1f} + optimizer "
                 f"{peak.optimizer_gb:.1f} + activations {peak.activations_gb:.1f} GB ({p.attention} attention)")
    lines.append(f"  recompute    {p.recompute} ({p.recompute_reason})")
    lines += [
        f"  FLOPs        {p.flops_formula}",
        f"               {n(p.model_flops_per_token)} model, {n(p.hardware_flops_per_token)} hardware FLOPs/token",
        f"  time         {p.step_seconds:.1f} s/step at {p.tflops_per_gpu:g} TFLOP/s per GPU; "
        f"{p.total_hours:.1f} h, {p.total_gpu_hours:,.0f} GPU-hours",
    ]
    if p.exit_duration_in_mins is not None:
        lines.append(f"  exit         save and exit after {p.exit_duration_in_mins:g} min per job")
    lines += [f"  note         {note}" for note in p.notes]
    return "\n".join(lines)


def _compact(values: list) -> str:
    """[1, 1, 1, 1] -> '1 x4'; mixed lists are shown in runs."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ", ".join(f"{v}" if c == 1 else f"{v} x{c}" for v, c in runs)
