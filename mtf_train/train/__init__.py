"""The trainer: `python -m mtf_train.train` (finetune_t0's arguments) on megatron-core and DeepSpeed."""
from mtf_train.compat import megatron_without_jit_fuser

megatron_without_jit_fuser()  # before any module of this package imports megatron.core
