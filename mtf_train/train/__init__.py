"""The trainer: `python -m mtf_train.train` (finetune_t0's arguments) on megatron-core and DeepSpeed."""
from mtf_train.compat import defer_import_compiles

defer_import_compiles()  # before any module of this package imports megatron.core
