"""Data for multitask finetuning, in the order it flows:

jsonl.py, _tokenize.py, preprocess.py   xP3 jsonl -> PREFIX_{inputs,targets}_document.{bin,idx}
tokenizer.py, indexed.py                tokenizer resolution (offline) and megatron-core's indexed datasets
pathfile.py, mixture.py, check.py       weighted split-path files, the mixtures that make them, their check
packing.py, cache.py, packed.py         packed MTF rows, blending, index caches: what the trainer reads
sample.py, testing.py                   the shipped sample data, helpers for tests
cli.py                                  `mtf-train data ...`
"""
