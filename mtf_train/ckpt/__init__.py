"""`mtf-train ckpt`: inspect, convert, reshape, export and import checkpoints in the bigscience layout.

One module per command (`inspect`, `universal`, `reshape`, `hf`), the file-level machinery they share
(`layout`: finding a checkpoint's files, reading tensors out of them without loading whole files, writing
files tensor by tensor) and the workers that run the real model under `torch.distributed.run` to verify
(`worker`, `verify`). Importing this package imports no torch.
"""
