"""The held-out task families BLOOMZ was judged on, as lm-evaluation-harness task definitions.

Each family has the fields of its published dataset, the languages it was published in, the split the paper's
rank evaluation used, and several English prompts (BLOOMZ was evaluated with English prompts; the median over
prompts is what it reported). Every prompt is an lm-eval `multiple_choice` task: the answer choices are scored
by log-likelihood after the prompt and the most likely one is the prediction (rank classification).

The paper's prompts are promptsource's English templates of each dataset (xnli, xcopa, story_cloze/xstory_cloze,
winogrande/xwinograd). XNLI's four are promptsource's wording ("GPT-3 style", "can we infer", "guaranteed true",
"based on the previous passage"), English label words after the question. XCOPA's "C1 or C2? premise, so/
because" is promptsource's too; the other XCOPA, XStoryCloze and XWinograd prompts keep promptsource's
elements (the choices quoted or listed, "pick the more plausible", "possible endings", "a novel ends with",
"fill in the blank") but name the choices first and end with the text the answer continues, where promptsource
lists the options after the premise, so that the answer follows its premise directly (small models attend
mostly to what is near). Scores are therefore close to, not equal to, the paper's. The plain continuation prompt
("premise" -> choice, the blank's prefix -> option) is lm-eval's own formulation of these tasks.

`write_task_configs` turns a selection into lm-eval task YAML files (one per task, language and prompt) whose
dataset is a local copy (`dataset_path: json|parquet` with `data_files`) or the hub. Pure Python: no lm-eval,
torch or datasets import, so plans and job rendering can name tasks without them.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtf_train.errors import UserError
from mtf_train.files import write_atomic


class EvalError(UserError):
    """Bad evaluation input (unknown task or language, missing or malformed dataset file): one line, exit 2."""


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str            # Jinja over the dataset row (lm-eval's doc_to_text)
    choices: str         # Jinja that renders a Python list of answer strings (doc_to_choice)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    languages: tuple[str, ...]          # as published
    split: str                          # the split the rank evaluation used
    fields: tuple[str, ...]             # required columns of the published schema
    target: str                         # Jinja: index of the right choice (doc_to_target)
    hub_path: str
    prompts: tuple[Prompt, ...]
    choices: int = 2                    # answer choices per row (chance = 1 / choices)

    def hub_name(self, lang: str) -> str:
        return lang


_COPA = "{{[choice1, choice2]}}"
_STORY = "{{input_sentence_1}} {{input_sentence_2}} {{input_sentence_3}} {{input_sentence_4}}"
_STORY_LINES = "{{input_sentence_1}}\n{{input_sentence_2}}\n{{input_sentence_3}}\n{{input_sentence_4}}"
_ENDINGS = "{{[sentence_quiz1, sentence_quiz2]}}"
_WINO_OPTIONS = "{{[option1, option2]}}"
_BEFORE_BLANK = "{{sentence.split('_')[0] | trim}}"  # the choice is scored where the blank is
_NLI_YES = "{{['Yes', 'Maybe', 'No']}}"

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        "xcopa", "XCOPA", ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"), "validation",
        ("premise", "choice1", "choice2", "question", "label"), "{{label}}", "cambridgeltl/xcopa",
        (Prompt("continuation", "{{premise}}", _COPA),
         Prompt("choice_or_choice", "\"{{choice1}}\" or \"{{choice2}}\"? {{premise}} "
                "{% if question == 'cause' %}because{% else %}so{% endif %}", _COPA),
         Prompt("pick_plausible", "Pick the more plausible {{question}}, \"{{choice1}}\" or \"{{choice2}}\":\n"
                "{{premise}}", _COPA),
         Prompt("options_first", "Options:\n- {{choice1}}\n- {{choice2}}\nWhich option is the {{question}} of the "
                "following?\n{{premise}}", _COPA))),
    Family(
        "xnli", "XNLI", ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"),
        "validation", ("premise", "hypothesis", "label"), "{{label}}", "facebook/xnli",
        (Prompt("gpt3_style", "{{premise}}\nQuestion: {{hypothesis}} True, False, or Neither?",
                "{{['True', 'Neither', 'False']}}"),
         Prompt("can_we_infer", "Suppose {{premise}} Can we infer that \"{{hypothesis}}\"? Yes, no, or maybe?",
                _NLI_YES),
         Prompt("guaranteed_true", "Given {{premise}} Is it guaranteed true that \"{{hypothesis}}\"? Yes, no, or "
                "maybe?", _NLI_YES),
         Prompt("based_on_passage", "{{premise}} Based on the previous passage, is it true that \"{{hypothesis}}\"? "
                "Yes, no, or maybe?", _NLI_YES)), choices=3),
    Family(
        "xstorycloze", "XStoryCloze", ("ar", "en", "es", "eu", "hi", "id", "my", "ru", "sw", "te", "zh"),
        "validation", ("input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4",
                       "sentence_quiz1", "sentence_quiz2", "answer_right_ending"),
        "{{answer_right_ending | int - 1}}", "Muennighoff/xstory_cloze",
        (Prompt("continuation", _STORY, _ENDINGS),
         Prompt("endings_first", "Possible endings: \"{{sentence_quiz1}}\" or \"{{sentence_quiz2}}\". Continue the "
                "story:\n" + _STORY, _ENDINGS),
         Prompt("story_lines", "Read the story and finish it with one of the two endings (\"{{sentence_quiz1}}\", "
                "\"{{sentence_quiz2}}\"):\n" + _STORY_LINES, _ENDINGS),
         Prompt("novel_ending", "A novel ends with either \"{{sentence_quiz1}}\" or \"{{sentence_quiz2}}\". Here is "
                "the novel: " + _STORY, _ENDINGS))),
    Family(
        "xwinograd", "XWinograd", ("en", "fr", "jp", "pt", "ru", "zh"), "test",
        ("sentence", "option1", "option2", "answer"), "{{answer | int - 1}}", "Muennighoff/xwinograd",
        (Prompt("blank_prefix", _BEFORE_BLANK, _WINO_OPTIONS),
         Prompt("option_or_option", "\"{{option1}}\" or \"{{option2}}\"? " + _BEFORE_BLANK, _WINO_OPTIONS),
         Prompt("fill_in_the_blank", "Fill in the blank with {{option1}} or {{option2}}: {{sentence}}\n"
                + _BEFORE_BLANK, _WINO_OPTIONS),
         Prompt("options_first", "Options:\n- {{option1}}\n- {{option2}}\nWhich option replaces the _?\n"
                + _BEFORE_BLANK, _WINO_OPTIONS))),
)}

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def task_name(family: str, lang: str, prompt: str) -> str:
    return f"mtf_{family}_{lang}__{prompt}"


def parse_task_name(name: str) -> tuple[str, str, str]:
    head, _, prompt = name.partition("__")
    _, family, lang = head.split("_", 2)
    return family, lang, prompt


def select(tasks: list[str] | None, languages: list[str] | None, where: str = "--tasks") -> list[tuple[str, str]]:
    """(family, language) pairs to evaluate. Unknown names are errors; a language that a chosen family was not
    published in is skipped for that family, and an error only when no chosen family has it."""
    chosen = list(tasks or FAMILIES)
    for t in chosen:
        if t not in FAMILIES:
            raise EvalError(where, f"unknown task {t!r} (known: {', '.join(FAMILIES)})")
    known = sorted({lang for t in chosen for lang in FAMILIES[t].languages})
    for lang in languages or []:
        if lang not in known:
            raise EvalError("--languages" if where == "--tasks" else where.replace("tasks", "languages"),
                            f"unknown language {lang!r} for {', '.join(chosen)} (known: {', '.join(known)})")
    return [(t, lang) for t in chosen for lang in FAMILIES[t].languages if not languages or lang in languages]


def local_file(data_dir: Path, family: Family, lang: str) -> Path | None:
    folder = data_dir / family.name / lang
    for suffix in DATA_SUFFIXES:
        if (folder / f"{family.split}{suffix}").is_file():
            return folder / f"{family.split}{suffix}"
    return None


def check_rows(path: Path, family: Family) -> int:
    """Rows in a local jsonl copy, each checked for the published schema's fields (parquet: the columns)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            cols = set(pq.read_schema(str(path)).names)
            n = pq.read_metadata(str(path)).num_rows
        except Exception as err:  # pyarrow's own error types
            raise EvalError(str(path), f"unreadable parquet file ({str(err).splitlines()[0][:120]})") from None
        missing = [f for f in family.fields if f not in cols]
        if missing:
            raise EvalError(str(path), f"missing field {missing[0]!r} of the {family.title} schema")
        return n
    n = 0
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    rows = json.loads(text) if path.suffix == ".json" and text.lstrip().startswith("[") else None
    lines = rows if rows is not None else [ln for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines, 1):
        try:
            row = line if rows is not None else json.loads(line)
        except ValueError as err:
            raise EvalError(f"{path}:{i}", f"not a JSON object ({err})") from None
        missing = [f for f in family.fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise EvalError(f"{path}:{i}", f"missing field {missing[0]!r} of the {family.title} schema "
                            f"({', '.join(family.fields)})")
        n += 1
    if not n:
        raise EvalError(str(path), "no rows")
    return n


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the datasets hub may be used: not forced offline and answering on its port."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_sources(pairs: list[tuple[str, str]], data_dir: str | os.PathLike | None, *,
                    languages_given: bool = False, tasks_given: bool = False) -> dict[tuple[str, str], dict]:
    """Where each (family, language) is read from. With a data folder, languages not asked for by name are
    evaluated where a local copy exists; a language or task asked for by name must have one. Without a data
    folder, the hub, when it is reachable. Every local file is checked against the family's schema."""
    sources: dict[tuple[str, str], dict] = {}
    hub = None
    for fam_name, lang in pairs:
        fam = FAMILIES[fam_name]
        path = local_file(Path(data_dir), fam, lang) if data_dir else None
        expected = Path(data_dir or "DATA_DIR") / fam.name / lang / f"{fam.split}.jsonl"
        if path is not None:
            rows = check_rows(path, fam)
            builder = "parquet" if path.suffix == ".parquet" else "json"
            sources[(fam_name, lang)] = {"dataset_path": builder,
                                         "dataset_kwargs": {"data_files": {fam.split: str(path.resolve())}},
                                         "source": str(path.resolve()), "rows": rows}
            continue
        if data_dir:
            if languages_given:
                raise EvalError(str(expected), f"no such file (a local copy of {fam.title} {lang}, "
                                f"{fam.split} split)")
            continue
        if hub is None:
            hub = hub_reachable()
        if not hub:
            raise EvalError(str(expected), f"no --data-dir given, and the hub is not reachable (offline) for "
                            f"{fam.hub_path} {lang}: put local copies under a folder and pass --data-dir")
        sources[(fam_name, lang)] = {"dataset_path": fam.hub_path, "dataset_name": fam.hub_name(lang),
                                     "source": f"hub:{fam.hub_path}/{fam.hub_name(lang)}", "rows": None}
    if data_dir:
        found = {f for f, _ in sources}
        for fam_name in dict.fromkeys(f for f, _ in pairs):
            if fam_name not in found and tasks_given:
                fam = FAMILIES[fam_name]
                raise EvalError(str(Path(data_dir) / fam.name), f"no local copy of {fam.title} in any language "
                                f"asked for (expected <language>/{fam.split}.jsonl)")
        if not sources:
            raise EvalError(str(data_dir), "no local copy of any task asked for (expected "
                            "<task>/<language>/<split>.jsonl, e.g. xnli/fr/validation.jsonl)")
    return sources


def write_task_configs(sources: dict[tuple[str, str], dict], out: Path) -> dict:
    """One lm-eval task YAML per (family, language, prompt) into `out`; returns task name -> description."""
    out.mkdir(parents=True, exist_ok=True)
    described = {}
    for (fam_name, lang), src in sources.items():
        fam = FAMILIES[fam_name]
        for p in fam.prompts:
            name = task_name(fam_name, lang, p.name)
            cfg = {"task": name, "dataset_path": src["dataset_path"], "test_split": fam.split,
                   "output_type": "multiple_choice", "doc_to_text": p.text, "doc_to_choice": p.choices,
                   "doc_to_target": fam.target, "target_delimiter": " ",
                   "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                   "metadata": {"version": 1.0}}
            if "dataset_name" in src:
                cfg["dataset_name"] = src["dataset_name"]
            if "dataset_kwargs" in src:
                cfg["dataset_kwargs"] = src["dataset_kwargs"]
            write_atomic(out / f"{name}.yaml", yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False, width=10_000))
            described[name] = {"task": fam_name, "language": lang, "prompt": p.name, "source": src["source"],
                               "rows": src["rows"]}
    return described
