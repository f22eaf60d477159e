"""`mtf-train ckpt`: inspect, convert, reshape, export and import checkpoints in the bigscience layout.

One module per command (`inspect`, `universal`, `reshape`, `hf`); the file-level machinery they share
(`layout`: finding a checkpoint's files and writing output folders whole; `torchzip`: reading tensors out of
torch.save files without loading them whole, and writing files tensor by tensor; `safe`: the unpickling
allowlist and CRC checks; `client`: the client state in either form; `errors`); the direct reshape's parts
(`source`: what a checkpoint is; `zero`: DeepSpeed's ZeRO layout reproduced; `fragments`: the source's
optimizer states read fragment by fragment; `direct`: writing the new checkpoint) and the workers that run the
real model, one process per rank, to verify (`worker`, `verify`). Importing this package imports no
torch.
"""
