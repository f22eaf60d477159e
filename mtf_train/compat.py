"""Every private or unstable API of DeepSpeed, megatron-core and torch that mtf-train relies on, and the versions
it was checked against.

DeepSpeed and megatron-core change their internals between minor releases without notice. `CHECKED` lists the
versions whose internals the entries below were read against and the tests passed with; tests/test_compat.py
fails when the installed DeepSpeed or megatron-core is not one of them, when a probed name is gone, and when a
range in pyproject.toml admits a minor release without a checked version. To take a new version: read each entry
against its source, run the tests named in `tested_by`, then add the version here and move the bound in
pyproject.toml.

Two test environments, one per megatron-core line: megatron-core 0.17 and later are published for Python >= 3.12
only, so pyproject.toml gives Python 3.11 and older 0.16.x and Python 3.12+ 0.19.x (environment markers).
- `.venv` (Python 3.11, constraints/cpu.txt: megatron-core 0.16.1, CPU torch): the whole suite, the README's
  test command;
- `.venv-py312` (Python 3.12, constraints/py312.txt: megatron-core 0.19.2, the newest of each pin): the tests of
  the trainer, checkpoints and parity, through scripts/test-newest. CI runs both (.ci/run).
Where the two lines differ, the code reacts to what megatron-core does, never to its version string, each in one
place: `defer_import_compiles` (torch.compile run while megatron.core or DeepSpeed's Muon is imported) and data/indexed.py's
`megatron_indexed` (0.17+ logs and warns on import and per dataset).

torch and lm-eval are listed for the record but not enforced: clusters bring their own CUDA build (pyproject keeps a range).
Stdlib only: importing this module imports none of the three.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types
from dataclasses import dataclass
from importlib import metadata

CHECKED = {
    "deepspeed": ("0.19.8",),
    "megatron-core": ("0.16.1", "0.19.2"),
    "torch": ("2.13.0",),
    "lm-eval": ("0.4.13",),
}
ENFORCED = ("deepspeed", "megatron-core")


@dataclass(frozen=True)
class Use:
    package: str            # distribution name, a key of CHECKED
    api: str                # what is relied on
    where: str              # mtf_train files that use it
    why: str
    tested_by: str          # the tests that fail if it changes
    probe: tuple[str, str] | None = None   # (module, attribute) that must exist, checked by tests/test_compat.py


USES = (
    Use("deepspeed", "ds_to_universal._inject_missing_state and _check_for_required_state, swapped during main()",
        "ckpt/universal.py", "supply BLOOM's universal_checkpoint_info to 2022 checkpoints; keep the vocabulary's "
        "padding rows", "tests/test_ckpt_tools.py, tests/test_ckpt_2022.py",
        ("deepspeed.checkpoint.ds_to_universal", "_inject_missing_state")),
    Use("deepspeed", "ds_to_universal.main(args) and the fields of its argparse Namespace", "ckpt/universal.py",
        "run DeepSpeed's converter in-process", "tests/test_ckpt_tools.py",
        ("deepspeed.checkpoint.ds_to_universal", "main")),
    Use("deepspeed", "engine._config.load_universal_checkpoint", "ckpt/worker.py",
        "after a universal load, save and reload as an ordinary checkpoint", "tests/test_ckpt_tools.py"),
    Use("deepspeed", "BF16_Optimizer's bf16_groups, fp32_groups_gradients, fp32_groups_has_gradients, "
        "update_hp_grads, immediate_grad_update and the parameters' _hp_grad", "train/bf16.py",
        "fused fp32 gradient accumulation (falls back to DeepSpeed's own when an attribute is missing)",
        "tests/test_train_bf16.py", ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer")),
    Use("deepspeed", "deepspeed.ops.__compatible_ops__", "train/cpu.py",
        "keep DeepSpeed from JIT-building its shared-memory comm op on CPU", "tests/test_train_run.py",
        ("deepspeed.ops", "__compatible_ops__")),
    Use("deepspeed", "deepspeed.runtime.utils.partition_uniform and partition_balanced", "ckpt/reshape.py",
        "reproduce PipelineModule's stage boundaries without building the model", "tests/test_ckpt_tools.py",
        ("deepspeed.runtime.utils", "partition_balanced")),
    Use("deepspeed", "deepspeed.utils.tensor_fragment.fragment_address", "ckpt/reshape.py",
        "write param_slice_mappings as DeepSpeed does", "tests/test_ckpt_tools.py",
        ("deepspeed.utils.tensor_fragment", "fragment_address")),
    Use("deepspeed", "ZeRO-1/BF16 optimizer files: zero_pp_rank_D_mp_rank_MM_optim_states.pt (bf16_ prefix) "
        "holding optimizer_state_dict.{param_slice_mappings, single_partition_of_fp32_groups, base_optimizer_state, "
        "group_paddings, partition_count, param_alignment_paddings}; flat groups aligned to 2 x dp",
        "ckpt/reshape.py, ckpt/layout.py, ckpt/inspect.py", "read and write checkpoints tensor by tensor",
        "tests/test_ckpt_tools.py, tests/test_ckpt_2022.py"),
    Use("deepspeed", "deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology", "train/parallel.py",
        "the pipeline grid with a model axis (layer_XX-model_YY file names)", "tests/test_train_parallel.py",
        ("deepspeed.runtime.pipe.topology", "PipeModelDataParallelTopology")),
    Use("deepspeed", "deepspeed.checkpoint.constants (UNIVERSAL_CHECKPOINT_INFO and the pattern keys)",
        "train/model.py, ckpt/universal.py", "universal checkpoint info for BLOOM", "tests/test_train_model.py",
        ("deepspeed.checkpoint.constants", "UNIVERSAL_CHECKPOINT_INFO")),
    Use("megatron-core", "tensor_parallel.random._CUDA_RNG_STATE_TRACKER and _CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "train/cpu.py", "a CPU RNG tracker in place of the CUDA one", "tests/test_train_model.py",
        ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED")),
    Use("megatron-core", "ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding parameters and "
        "attributes (their forward is re-implemented), set_tensor_model_parallel_attributes",
        "train/model.py", "megatron's weights, init and checkpoint names with our own forward",
        "tests/test_train_model.py, tests/test_train_blocks_tp2.py",
        ("megatron.core.tensor_parallel", "set_tensor_model_parallel_attributes")),
    Use("megatron-core", "importing megatron.core runs torch.compile(function): jit.py's `jit_fuser = torch.compile` "
        "on its fused kernels, and 0.17+'s InferenceTopKRouter @torch.compile; deferred to the first call while the "
        "megatron.core package is imported",
        "compat.py, train/__init__.py, data/indexed.py",
        "the decoration alone imports torch._dynamo and inductor (2-3 s per process)", "tests/test_compat.py"),
    Use("deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer decorates its kernels with torch.compile while "
        "imported (through runtime.compiler.compile()); deferred to the first call like megatron.core's",
        "compat.py, train/__init__.py", "the engine imports it in every ZeRO/BF16 optimizer check: 1-1.5 s of "
        "each rank's start for an optimizer mtf-train never uses", "tests/test_compat.py",
        ("deepspeed.runtime.zero.muon.muon_optimizer", "MuonWithAuxAdam")),
    Use("megatron-core", "megatron.core.datasets.indexed_dataset (the .bin/.idx format)", "data/indexed.py",
        "read and write Megatron's indexed datasets", "tests/test_data_preprocess.py",
        ("megatron.core.datasets.indexed_dataset", "IndexedDataset")),
    Use("torch", "torch._weights_only_unpickler._get_allowed_globals", "ckpt/layout.py",
        "the lazy reader allows what torch.load(weights_only=True) allows", "tests/test_ckpt_tools.py",
        ("torch._weights_only_unpickler", "_get_allowed_globals")),
    Use("torch", "torch.save's zip layout and the torch._utils._rebuild_tensor_v2/_v3/_rebuild_parameter globals",
        "ckpt/layout.py", "read tensors out of checkpoint files lazily, by offset", "tests/test_ckpt_tools.py",
        ("torch._utils", "_rebuild_tensor_v2")),
    Use("torch", "the globals torch.save pickles (legacy storage classes torch.FloatStorage..., dtypes as torch.<name>, "
        "torch.Size, torch.device) and the non-torch names of the weights-only allowlist (_codecs.encode, ...)",
        "ckpt/torchzip.py", "read a checkpoint's structure without importing torch (inspect, the tools' input "
        "checks); an unknown torch global falls back to the torch reader",
        "tests/test_ckpt_tools.py, tests/test_ckpt_2022.py"),
    Use("torch", "torch._foreach_add_ and torch._foreach_zero_", "train/bf16.py", "one kernel per group",
        "tests/test_train_bf16.py", ("torch", "_foreach_add_")),
    Use("lm-eval", "lm_eval.utils.apply_template and utils.env (its Jinja environment), replaced by a cached "
        "version; skipped when either is missing", "eval/run.py", "lm-eval compiles every prompt template once "
        "per document: half of a CPU evaluation", "tests/test_eval.py", ("lm_eval.utils", "apply_template")),
)


def version_problems() -> list[str]:
    """One line per enforced package whose installed version was not checked (empty when all were)."""
    problems = []
    for package in ENFORCED:
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed")
            continue
        if installed not in CHECKED[package]:
            uses = sum(u.package == package for u in USES)
            problems.append(f"{package} {installed} is not among the versions mtf_train/compat.py was checked "
                            f"against ({', '.join(CHECKED[package])}): re-check its {uses} entries in USES, "
                            f"then add {installed} to CHECKED")
    return problems


def defer_import_compiles() -> None:
    """Before megatron.core or DeepSpeed's Muon optimizer is imported: make the torch.compile(function) their import
    runs compile on the function's first call instead (see `_DeferCompile`).

    megatron/core/jit.py sets `jit_fuser = torch.compile`, and importing megatron.core decorates its fused bias-GeLU,
    SwiGLU, dropout, MoE... kernels with it (0.17+ also decorates InferenceTopKRouter directly); DeepSpeed's engine
    imports Muon, whose kernels are decorated the same way, in every ZeRO/BF16 optimizer check. The decoration
    alone imports torch._dynamo and inductor: seconds of every rank's and every data or checkpoint tool's start, for
    kernels mtf-train never calls (it uses megatron's parameters with its own forward, and AdamW). Called again, or
    after those modules were imported, it does nothing.
    """
    if not any(isinstance(finder, _DeferCompile) for finder in sys.meta_path):
        sys.meta_path.insert(0, _DeferCompile())


# Modules whose import runs torch.compile(function) on kernels mtf-train never calls: megatron.core (0.17+) and
# DeepSpeed's Muon optimizer, which every ZeRO/BF16 optimizer check imports (1-1.5 s of each rank's start).
DEFERRED_COMPILE_IMPORTS = ("megatron.core", "deepspeed.runtime.zero.muon.muon_optimizer")


class _DeferCompile(importlib.abc.MetaPathFinder):
    """Runs the import of a module of DEFERRED_COMPILE_IMPORTS (its own imports nest inside it) with
    `torch.compile` returning, for a plain function, a wrapper that compiles it on first call: the decoration alone
    would import torch._dynamo and inductor. Other uses (an nn.Module) get the real torch.compile."""

    def find_spec(self, name, path, target=None):
        if name not in DEFERRED_COMPILE_IMPORTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_deferred_compile(module):
            import torch  # the module's first import anyway

            real = torch.compile
            torch.compile = _deferred_compile(real)
            try:
                exec_module(module)
            finally:
                torch.compile = real

        spec.loader.exec_module = exec_with_deferred_compile
        return spec


def _deferred_compile(real):
    def compile_(model=None, **options):
        if model is None:  # `@torch.compile(...)` with options
            return lambda fn: compile_(fn, **options)
        if not isinstance(model, types.FunctionType):
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def compiles_on_first_call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return compiles_on_first_call

    return compile_
