"""`mtf-train eval`: zero-shot rank classification with the real lm-eval and transformers, on the tiny run's
checkpoint (trained once per module through the CLI, as a user does) and the shipped evaluation sample.

The scores are checked three ways: the trained checkpoint beats chance where an untrained model of the same
shape does not; they equal a rank classification computed here directly with transformers on the same prompts;
and the files, table, plot and `status` line show them. Bad input is one line and exit 2.
"""
from __future__ import annotations

import ast
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import EVAL_ENV, copy_run
from tests.helpers import RECIPES, ROOT, mtf, one_line_error

TINY = str(RECIPES / "tiny-local.yaml")
SAMPLE = ROOT / "data" / "sample" / "eval"
LEARNABLE = ("xcopa", "xstorycloze", "xwinograd")  # XNLI's English label words are never taught by the sample
# Offline, as on a cluster node without internet; one thread each, as several tests share this machine's cores.
ENV = EVAL_ENV
# The module trains the tiny recipe once (the first test pays for it): allow for a busy machine.
pytestmark = pytest.mark.timeout(2400)
# What `mtf-train eval` shows on the terminal: where things are and the table. Progress bars and library warnings
# go to logs/eval.log beside the results.
SHOWN = (r"evaluating .* results in .* \(full log: .*/logs/eval\.log\)$",
         r"step_\d+: (exported to transformers in|transformers export cached in) ", r"### Zero-shot accuracy",
         r"Rank classification; ", r"\|", r"step_\d+: \S+/results\.json \(\d+\.\d s\)$", r"accuracy against step: ",
         "")


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    assert proc.stderr == "", proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        assert any(re.match(p, line) if p else not line for p in SHOWN), f"unexpected line: {line!r}\n{proc.stdout}"


@pytest.fixture(scope="module")
def run(tiny_default_run, tmp_path_factory) -> Path:
    """The README's loop: train the tiny recipe (checkpoints at steps 60 and 120; the session's shared run,
    tests/fixtures.py, copied as we write into it), then `mtf-train eval RUN`."""
    trained, _ = tiny_default_run
    run_dir = copy_run(trained, tmp_path_factory.mktemp("runs") / "tiny-local" / trained.name)
    proc = mtf("eval", str(run_dir), env=ENV, timeout=900)  # data_dir comes from the recipe
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| xcopa |" in proc.stdout and "results.json" in proc.stdout
    assert_quiet(proc)
    assert "exported " in (run_dir / "logs" / "eval.log").read_text()  # the export's own report, in the log
    return run_dir


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, run) -> Path:
    """A transformers BLOOM folder of the same shape and tokenizer, freshly initialised (seed 0)."""
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    hf = run / "hf" / "step_120"
    out = tmp_path_factory.mktemp("untrained") / "bloom-untrained"
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig.from_pretrained(hf)).save_pretrained(out)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def pooled(res: dict, tasks=LEARNABLE) -> float:
    """Mean over tasks, languages and prompts of the accuracy."""
    return statistics.mean(a for t in tasks for cell in res["tasks"][t].values() for a in cell["prompts"].values())


def test_trained_beats_chance_where_untrained_does_not(run, untrained, tmp_path):
    trained = results(run / "eval" / "step_120")
    assert set(trained["tasks"]) == {"xcopa", "xnli", "xstorycloze", "xwinograd"}
    assert set(trained["tasks"]["xnli"]) == {"ar", "en", "es", "fr", "hi", "sw", "zh"}
    cell = trained["tasks"]["xcopa"]["zh"]
    assert len(cell["prompts"]) == 4 and cell["n"] == 40 and cell["chance"] == 0.5
    assert cell["min"] <= cell["median"] <= cell["max"]
    proc = mtf("eval", str(untrained), "--data-dir", str(SAMPLE), "--tasks", ",".join(LEARNABLE), "--batch-size", "64",
               "-o", str(tmp_path / "u"), env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = results(tmp_path / "u" / "eval" / "bloom-untrained")
    t, u = pooled(trained), pooled(base)
    print(f"pooled accuracy on {', '.join(LEARNABLE)}: trained {t:.3f}, untrained {u:.3f} (chance 0.5)")
    assert t >= 0.58, (t, u)           # about 2,700 scored rows: chance would rarely pass 0.52
    assert abs(u - 0.5) <= 0.04, u     # the untrained model is at chance
    assert t - u >= 0.06, (t, u)


def _reference(hf: Path, res: dict) -> dict:
    """Rank classification with transformers alone: each prompt rendered from its Jinja, each choice's summed
    log-probability after it (the context's trailing whitespace moved into the continuation, as lm-eval does)."""
    import jinja2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtf_train.eval.tasks import FAMILIES

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = {}
    for task, cells in res["tasks"].items():
        fam = FAMILIES[task]
        for lang, cell in list(cells.items())[:1]:  # one language per task keeps this loop of single passes short
            rows = [json.loads(x) for x in Path(cell["source"]).read_text().splitlines()]
            for p in fam.prompts:
                right = 0
                for row in rows:
                    ctx = env.from_string(p.text).render(**row)
                    choices = ast.literal_eval(env.from_string(p.choices).render(**row))
                    gold = int(env.from_string(fam.target).render(**row))
                    scores = []
                    for choice in choices:
                        c, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + " " + choice
                        ids_c = tok(c, add_special_tokens=False)["input_ids"]
                        ids = tok(c + cont, add_special_tokens=False)["input_ids"]
                        with torch.no_grad():
                            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                        scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ids_c), len(ids))))
                    right += int(max(range(len(scores)), key=scores.__getitem__) == gold)
                out[(task, lang, p.name)] = right / len(rows)
    return out


def test_scores_equal_rank_classification_with_transformers(run):
    res = results(run / "eval" / "step_120")
    ref = _reference(run / "hf" / "step_120", res)
    ours = {(t, lang, p): a for t, cells in res["tasks"].items() for lang, c in list(cells.items())[:1]
            for p, a in c["prompts"].items()}
    assert len(ours) == 16
    assert ours.keys() == ref.keys()
    worst = max(abs(ours[k] - ref[k]) for k in ours)
    assert worst <= 1e-6, {k: (ours[k], ref[k]) for k in ours if abs(ours[k] - ref[k]) > 1e-6}


def test_results_table_plot_and_status(run):
    step = run / "eval" / "step_120"
    table = (step / "results.md").read_text()
    assert "| task | ar | en | es | fr | hi | sw | zh | mean | chance |" in table
    assert re.search(r"^\| xcopa \|  \|  \|  \|  \|  \| \d+\.\d \(\d+\.\d-\d+\.\d\) \|", table, re.M), table
    assert len(list((step / "tasks").glob("*.yaml"))) == 18 * 4  # the exact task files lm-eval ran
    status = mtf("status", str(run), check=True).stdout
    assert re.search(r"^zero-shot   step 120: xcopa \d+\.\d \| xnli \d+\.\d \| xstorycloze \d+\.\d \| xwinograd",
                     status, re.M), status
    # Every saved step, two tasks, one language: step 60 is exported now and step 120's export is cached; with
    # two steps evaluated, accuracy against step; each step's results hold what was asked this time.
    proc = mtf("eval", str(run), "--all-steps", "--tasks", "xcopa,xwinograd", "--languages", "zh", env=ENV,
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step_120: transformers export cached in" in proc.stdout
    assert "step_60: exported to transformers in" in proc.stdout
    assert (run / "hf" / "step_60" / "config.json").is_file()
    assert results(run / "eval" / "step_60")["step"] == 60
    png = run / "eval" / "accuracy_vs_step.png"
    assert png.stat().st_size > 5000 and "accuracy against step" in proc.stdout
    assert_quiet(proc)
    for n in (60, 120):
        got = results(run / "eval" / f"step_{n}")["tasks"]
        assert {t: set(cells) for t, cells in got.items()} == {"xcopa": {"zh"}, "xwinograd": {"zh"}}, got


def test_bad_input_is_one_line(run, tmp_path):
    assert "unknown task 'xcopaa'" in one_line_error(mtf("eval", str(run), "--tasks", "xcopaa"))
    assert "unknown language 'de'" in one_line_error(mtf("eval", str(run), "--tasks", "xcopa", "--languages", "de"))
    line = one_line_error(mtf("eval", str(run), "--data-dir", str(SAMPLE), "--tasks", "xnli", "--languages", "bg",
                              env=ENV))
    assert "xnli/bg/validation.jsonl: no such file" in line
    assert "no global_step7" in one_line_error(mtf("eval", str(run), "--step", "7"))
    bad = tmp_path / "data" / "xcopa" / "sw"
    bad.mkdir(parents=True)
    (bad / "validation.jsonl").write_text('{"premise": "x", "choice1": "a", "choice2": "b", "label": 0}\n')
    line = one_line_error(mtf("eval", str(run), "--data-dir", str(tmp_path / "data"), "--tasks", "xcopa"))
    assert "validation.jsonl:1: missing field 'question'" in line
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    assert "not a BLOOM model" in one_line_error(mtf("eval", str(gpt2), "--data-dir", str(SAMPLE)))
    assert "not a run folder" in one_line_error(mtf("eval", str(tmp_path / "data"), "--data-dir", str(SAMPLE)))
    offline = one_line_error(mtf("eval", str(gpt2), "--tasks", "xcopa", env=ENV))
    assert "hub is not reachable" in offline


@pytest.mark.parametrize("recipe,gpus", [("bloomz-176b", 6), ("bloomz-7b1", 1)])
def test_eval_job_renders_sized_by_the_plan(tmp_path, recipe, gpus):
    """eval.zero_shot.job renders eval.sbatch: one node, GPUs for the bf16 weights + headroom, lm-eval's HF
    backend spreading the model over them; every_step evaluates each saved step. No torch on this path."""
    out = tmp_path / recipe
    proc = mtf("render", str(RECIPES / f"{recipe}.yaml"), "-o", str(out), "--set", "eval.zero_shot.job=every_step",
               "--set", "eval.zero_shot.data_dir=/data/xeval", "--set", "eval.zero_shot.tasks=[xnli,xcopa]",
               "--set", "cluster.partition=gpu", check=True)
    assert "eval.sbatch" in proc.stdout
    script = (out / "eval.sbatch").read_text()
    assert f"#SBATCH --gres=gpu:{gpus}\n" in script and "#SBATCH --nodes=1\n" in script
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --time=02:00:00\n" in script
    assert f"#SBATCH --job-name={recipe}-eval\n" in script
    for flag in ("--tasks xnli,xcopa", "--data-dir /data/xeval", "--all-steps", "--device cuda", "--dtype bfloat16",
                 "--parallelize"):
        assert flag in script, flag
    assert f"-m mtf_train.cli eval \"$RUN_DIR\"" in script and '-e "$RUN_DIR/finished"' in script
    assert subprocess.run(["bash", "-n", str(out / "eval.sbatch")]).returncode == 0
    assert not (tmp_path / "none").exists()
    plain = mtf("render", str(RECIPES / f"{recipe}.yaml"), "-o", str(tmp_path / "none"), check=True)
    assert "eval.sbatch" not in plain.stdout  # job: none (the default) renders no evaluation job


def test_eval_section_is_validated():
    line = one_line_error(mtf("validate", TINY, "--set", "eval.zero_shot.languages=[xx]"))
    assert "eval.zero_shot.languages: unknown language 'xx'" in line
    line = one_line_error(mtf("validate", TINY, "--set", "eval.zero_shot.job=after_training",
                              "--set", "eval.zero_shot.time=soon"))
    assert "eval.zero_shot.time: 'soon' is not a SLURM time" in line
