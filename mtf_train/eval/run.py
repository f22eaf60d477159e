"""`mtf-train eval`: rank classification with lm-evaluation-harness on the project's task definitions.

For each model (a step of a run, a checkpoint, a transformers folder): the selected tasks are written as lm-eval
task YAML files into the step's result folder (so the exact prompts stay with the scores), lm-eval's HF backend
scores every answer choice by log-likelihood (`simple_evaluate`, `TaskManager(include_path=...)`), and the
accuracy of each prompt is summarised per task and language as median, min and max over prompts, as BLOOMZ
reported. Results: `eval/<step_N>/results.json` and `results.md`, written under a temporary name and renamed;
`eval/accuracy_vs_step.png` when more than one step has results.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from mtf_train.eval import report
from mtf_train.eval.target import Target, ensure_hf, resolve
from mtf_train.eval.tasks import FAMILIES, resolve_sources, select, write_task_configs


@contextlib.contextmanager
def _output_to(log: Path):
    """Everything written to this process's stdout and stderr (tqdm bars, library warnings, lm-eval's logging,
    C-level messages) goes to `log`, at the file-descriptor level; what the user sees is printed through the
    function this yields, on the terminal's stdout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} mtf-train {' '.join(sys.argv[1:])}\n")
        fh.flush()
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield lambda text="": (terminal.write(text + "\n"), terminal.flush(), print(text, flush=True))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def _quiet_environment() -> None:
    """Before the libraries are imported: tqdm reads TQDM_DISABLE when it is imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval draws a bar per task and prompt; the table says enough


def _quiet_libraries() -> None:
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # an older datasets without these helpers: only noisier
        pass


def _compile_templates_once() -> None:
    """lm-eval (0.4.x) compiles a prompt's Jinja template again for every document it renders (17,000
    compilations for the shipped sample: half of a CPU evaluation). Same environment and templates, compiled
    once each."""
    from lm_eval import utils

    if getattr(utils.apply_template, "mtf_cached", False) or not hasattr(utils, "env"):
        return  # patched already, or a version that renders differently: leave it as it is
    compiled = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.mtf_cached = True
    utils.apply_template = apply_template


def lm_eval_scores(hf_dir: Path, task_dir: Path, names: list[str], *, batch_size: int, device: str,
                   dtype: str, parallelize: bool) -> dict[str, dict]:
    """lm-eval's accuracy per task name: {"acc": float, "n": int}."""
    _quiet_libraries()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _compile_templates_once()
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    model_args = {"pretrained": str(hf_dir), "dtype": dtype}
    if parallelize:
        model_args["parallelize"] = True
    out = simple_evaluate(model="hf", model_args=model_args, tasks=names, task_manager=tm, batch_size=batch_size,
                          device=None if parallelize else device, log_samples=False, bootstrap_iters=0,
                          num_fewshot=0)
    scores = {}
    for name in names:
        res = out["results"][name]
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        scores[name] = {"acc": float(res["acc,none"]), "n": n}
    return scores


def _hidden_size(hf_dir: Path) -> int:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return int(cfg.get("hidden_size") or cfg.get("n_embed") or 1 << 30)


def summarise(scores: dict[str, dict], described: dict[str, dict]) -> dict:
    """task -> language -> {median, min, max, prompts: {prompt: acc}, n, source, chance}."""
    table: dict[str, dict] = {}
    for name, d in described.items():
        cell = table.setdefault(d["task"], {}).setdefault(d["language"], {
            "prompts": {}, "n": scores[name]["n"] or d["rows"], "source": d["source"],
            "chance": 1 / FAMILIES[d["task"]].choices})
        cell["prompts"][d["prompt"]] = scores[name]["acc"]
    for langs in table.values():
        for cell in langs.values():
            accs = list(cell["prompts"].values())
            cell.update(median=statistics.median(accs), min=min(accs), max=max(accs))
    return table


def evaluate(target: str, *, tasks: list[str] | None, languages: list[str] | None, data_dir: str | None,
             step: int | None, all_steps: bool, output: str | None, batch_size: int, device: str | None,
             dtype: str | None, parallelize: bool, verify_export: bool) -> int:
    pairs = select(tasks, languages)
    sources = resolve_sources(pairs, data_dir, languages_given=bool(languages), tasks_given=bool(tasks))
    tgt: Target = resolve(target, step=step, all_steps=all_steps, output=output)
    eval_root = tgt.out / "eval"
    eval_root.mkdir(parents=True, exist_ok=True)
    log = tgt.out / "logs" / "eval.log"
    print(f"evaluating {tgt.path} ({tgt.kind}; {len(tgt.models)} model(s)): "
          f"{len(sources)} task-language pair(s), results in {eval_root} (full log: {log})", flush=True)
    with _output_to(log) as say:
        _quiet_environment()
        import torch  # after the cheap checks: a bad argument is refused before the heavy imports

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        for model in tgt.models:
            t0 = time.perf_counter()
            hf_dir = ensure_hf(model, tgt.out, verify=verify_export, say=say)
            if device == "cpu" and "OMP_NUM_THREADS" not in os.environ and _hidden_size(hf_dir) <= 256:
                # Matmuls this small gain nothing from threads and lose much to their hand-offs (the tiny run:
                # 10.6 s with one thread, 44 s with two, on a busy 2-core machine).
                torch.set_num_threads(1)
            final = eval_root / model.label
            staging = eval_root / f".{model.label}.tmp{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                described = write_task_configs(sources, staging / "tasks")
                names = list(described)
                scores = lm_eval_scores(hf_dir, staging / "tasks", names, batch_size=batch_size, device=device,
                                        dtype=dtype, parallelize=parallelize)
                table = summarise(scores, described)
                results = {"target": str(tgt.path), "model": str(hf_dir), "label": model.label, "step": model.step,
                           "time": time.time(), "seconds": round(time.perf_counter() - t0, 1), "device": device,
                           "dtype": dtype, "method": "rank classification, zero-shot, median/min/max over prompts",
                           "versions": report.versions(), "tasks": table}
                (staging / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
                (staging / "results.md").write_text(report.markdown(results))
                if final.exists():
                    old = eval_root / f".{model.label}.old{os.getpid()}"
                    os.replace(final, old)
                    os.replace(staging, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            say(report.markdown(results).rstrip("\n") + "\n")
            say(f"{model.label}: {final / 'results.json'} ({results['seconds']} s)")
        plot = report.plot_steps(eval_root)
        if plot:
            say(f"accuracy against step: {plot}")
    return 0
