"""The `data` command group: preprocess, index, mixture, check, sample.

`register(subparsers)` adds it to the main CLI. Imports stay inside the handlers, so that `--help` never
loads torch, megatron or tokenizers.
"""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> argparse.ArgumentParser:
    data = subparsers.add_parser("data", help="prepare data: preprocess jsonl, build packing indexes, mixtures",
                                 description="Data preparation for multitask finetuning (xP3 style).")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = sub.add_parser("preprocess", help="xP3 jsonl -> P_{inputs,targets}_document.{bin,idx}",
                       description="Tokenize xP3 rows {\"inputs\", \"targets\"}: inputs as they are, targets with a "
                       "leading space and the end-of-document token. Bad rows are skipped and listed in "
                       "P_skipped.txt (or fail the run with --strict). Nothing is left half-written.")
    p.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="FILE|DIR|-",
                   help="jsonl files, folders (searched recursively for *.jsonl, e.g. a language folder) or - "
                   "for stdin; all are merged into one dataset")
    p.add_argument("--output-prefix", "-o", required=True, metavar="P", help="output prefix, e.g. data/xp3_en")
    p.add_argument("--tokenizer", "-t", required=True, metavar="T",
                   help="a local HF tokenizer folder (with tokenizer.json) or a hub name already in the local cache")
    p.add_argument("--workers", "-w", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), metavar="N",
                   help="tokenizer processes; 0 tokenizes in this process (default: %(default)s)")
    p.add_argument("--dedup", action="store_true", help="drop repeated rows, keeping the first (sort -u)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the rows with --seed (shuf)")
    p.add_argument("--seed", type=int, default=1234, help="seed of --shuffle (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping it")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="skip (and list) rows of more than N tokens, inputs + targets; 0: no bound "
                   "(default: 131072, far beyond any sequence length a finetune packs)")
    p.add_argument("--report", metavar="FILE", help="where skipped rows are listed (default: P_skipped.txt)")
    p.add_argument("--write-merged", metavar="FILE",
                   help="also write the merged (de-duplicated, shuffled) jsonl, e.g. to measure its size")
    p.add_argument("--tmp-dir", metavar="DIR", help="folder for the de-duplicate/shuffle buckets (default: next "
                   "to the output)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with rows and tokens per second (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("index", help="build a recipe's packing index caches ahead, on CPU",
                       description="Build the packing indexes the trainer needs for RECIPE (train and validation), "
                       "so that no rank builds them at job start. Safe to run while a job starts.")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, as for the main command")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the indexes go (default: next to the data, else the user cache folder)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("mixture", help="write train/validation path files from a mixture YAML",
                       description="Weights = size / total x upsample, written as the 2022 path files were.")
    p.add_argument("mixture", metavar="MIXTURE.yaml")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR")
    p.add_argument("--root", metavar="DIR", help="where `measure` sizes are measured (default: the file's root:)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the files in DIR differ from what the mixture gives")
    p.set_defaults(func=cmd_mixture)

    p = sub.add_parser("check", help="check a path file's datasets and show sizes, shares and epochs",
                       description="Parse PATHFILE, check each prefix's four files, and print per dataset the "
                       "documents, tokens, share and (with --recipe) the epochs its training length implies.")
    p.add_argument("pathfile", metavar="PATHFILE")
    p.add_argument("--recipe", metavar="RECIPE", help="take the root, seq length, length and seed from a recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (with --recipe)")
    p.add_argument("--root", metavar="DIR",
                   help="folder relative prefixes are under (default: the recipe's data.root, else PATHFILE's folder)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sample", help="regenerate the shipped xP3-style sample data, tokenizer and datasets",
                       description="Write jsonl/<dataset>/*.jsonl, tokenizer/ and xp3_<dataset>_* under DIR.")
    p.add_argument("-o", "--output-dir", default="data/sample", metavar="DIR", help="default: %(default)s")
    p.add_argument("--rows", type=int, default=100, help="rows per templated task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="generation and shuffle seed (default: the shipped one)")
    p.add_argument("--keep-tokenizer", action="store_true", help="reuse DIR/tokenizer instead of training one")
    p.set_defaults(func=cmd_sample)
    return data


def _interrupted() -> int:
    print("interrupted: no output written", file=sys.stderr)
    return 130


def cmd_preprocess(args) -> int:
    from mtf_train.data.errors import DataError
    from mtf_train.data.preprocess import Interrupted, preprocess

    try:
        res = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers, dedup=args.dedup,
                         shuffle=args.shuffle, seed=args.seed, strict=args.strict, progress=args.progress,
                         report=args.report, merged_jsonl=args.write_merged, tmp_dir=args.tmp_dir,
                         **({} if args.max_tokens is None else {"max_tokens": args.max_tokens}))
    except Interrupted:
        return _interrupted()
    except OSError as err:  # e.g. a full disk while writing
        raise DataError(err.filename or args.output_prefix, err.strerror or str(err)) from None
    print(res.summary())
    return 0


def _recipe_and_groups(path: str, sets):
    from mtf_train.recipe.load import load_recipe, path_groups

    recipe = load_recipe(path, sets)
    return recipe, path_groups(recipe)


def cmd_index(args) -> int:
    import time

    from mtf_train.data.packed import build_datasets, recipe_sample_counts

    recipe, (train_groups, valid_groups) = _recipe_and_groups(args.recipe, args.sets)
    counts = recipe_sample_counts(recipe)
    t0 = time.perf_counter()
    train, valid = build_datasets(train_groups, valid_groups, seq_length=recipe.model.seq_length,
                                  train_samples=counts.train_samples,
                                  eval_samples_per_group=counts.eval_samples_per_group,
                                  seed=recipe.training.seed, pad_id=0, cache_dir=args.cache_dir, open_readers=False)
    print(f"{args.recipe}: seq_length {recipe.model.seq_length}, seed {recipe.training.seed}, "
          f"{counts.train_samples:,} train samples ({counts.train_iters:,} steps), "
          f"{counts.eval_samples_per_group:,} eval samples per validation group")
    built = reused = 0
    folders = set()
    for blend in [train, *valid.values()]:
        print(f"{blend.name}: {len(blend):,} samples from {len(blend.datasets)} datasets")
        for d in blend.describe():
            built += d["built"]
            reused += not d["built"]
            folders.add(os.path.dirname(d["index"]))
            lo, hi = d["doc_range"]
            print(f"  {os.path.basename(d['prefix'])}: documents [{lo:,}, {hi:,}), {d['skipped_too_long']:,} too long, "
                  f"{d['rows_per_epoch']:,} rows/epoch, {d['samples']:,} samples = {d['epochs']:.2f} epochs, "
                  f"{'built' if d['built'] else 'reused'}")
    print(f"indexes: {built} built, {reused} reused in {time.perf_counter() - t0:.1f} s; "
          f"in {', '.join(sorted(folders))}")
    return 0


def cmd_mixture(args) -> int:
    from pathlib import Path

    from mtf_train.data.mixture import check_output_dir, load_mixture, write_path_files

    if not args.check:
        check_output_dir(args.output_dir)
    mix = load_mixture(args.mixture, root=args.root)
    for d in mix.datasets:
        if d.measured:
            print(f"{d.name}: size {d.size:,.0f} ({d.measured})")
    if args.check:
        differ = []
        for name, text in mix.path_files().items():
            target = Path(args.output_dir) / name
            if not target.is_file() or target.read_text() != text:
                differ.append(str(target))
        for f in differ:
            print(f"{f}: differs from what {args.mixture} gives")
        if not differ:
            print("path files are up to date")
        return 1 if differ else 0
    for f in write_path_files(mix, args.output_dir):
        print(f"wrote {f}")
    return 0


def cmd_check(args) -> int:
    from pathlib import Path

    from mtf_train.data.check import check_groups, format_reports
    from mtf_train.data.errors import DataError
    from mtf_train.data.pathfile import read_path_file, rebase

    groups = read_path_file(args.pathfile)
    kw: dict = {}
    root = args.root
    if args.recipe:
        from mtf_train.data.packed import recipe_sample_counts
        from mtf_train.recipe.load import load_recipe

        recipe = load_recipe(args.recipe, args.sets)
        counts = recipe_sample_counts(recipe)
        is_valid = recipe.data.valid_path and os.path.realpath(args.pathfile) == os.path.realpath(recipe.data.valid_path)
        n = counts.eval_samples_per_group if is_valid else counts.train_samples
        root = root or recipe.data.root
        kw = dict(seq_length=recipe.model.seq_length, num_samples=n, seed=recipe.training.seed)
        print(f"{args.recipe}: seq_length {recipe.model.seq_length}, "
              + (f"{n:,} eval samples per group" if is_valid else
                 f"{n:,} train samples ({counts.train_iters:,} steps)") + f", seed {recipe.training.seed}")
    elif args.sets:
        raise DataError("--set", "needs --recipe")
    groups = rebase(groups, root or str(Path(args.pathfile).resolve().parent))
    reports = check_groups(groups, **kw)
    print(format_reports(reports))
    problems = [p for r in reports for p in r.problems]
    for p in problems:  # part of the report (stdout); stderr keeps the one-line error
        print(f"problem: {p}")
    if problems:
        raise DataError(args.pathfile, f"{len(problems)} problem(s) with its datasets (listed above)")
    print(f"{args.pathfile}: all {len(reports)} datasets have their four files")
    return 0


def cmd_sample(args) -> int:
    from mtf_train.data.preprocess import Interrupted
    from mtf_train.data.sample import SEED, build_sample

    try:
        results = build_sample(args.output_dir, seed=SEED if args.seed is None else args.seed, rows=args.rows,
                               train_tok=not args.keep_tokenizer)
    except Interrupted:
        return _interrupted()
    for r in results:
        print(f"{r.output_prefix}: {r.rows_written:,} rows ({r.duplicates:,} duplicates removed), "
              f"{r.input_tokens:,} + {r.target_tokens:,} tokens")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (`python -m mtf_train.data.cli ...`), the same as `mtf-train data ...`."""
    from mtf_train.errors import UserError

    parser = argparse.ArgumentParser(prog="mtf-train")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"mtf-train: error: {err.line()}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    from mtf_train.process import exit_now

    exit_now(main())
