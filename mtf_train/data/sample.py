"""The shipped xP3-style sample: templated tasks over generated content in a handful of languages plus code.

`mtf-train data sample -o data/sample` writes, in a few seconds and deterministically:
  jsonl/<lang>/<task>.jsonl        xP3 rows {"inputs", "targets"}, one file per task (prompt), as in xP3
  tokenizer/                       a byte-level BPE trained on these rows (eod `</s>`, pad `<pad>`)
  xp3_<lang>_{inputs,targets}_document.{bin,idx}   each language merged, de-duplicated, shuffled, tokenized
The rows are made up by this module (no downloaded data): arithmetic word problems, review sentiment,
smallest/largest number, translation of a small parallel phrase list, and Python/JavaScript code tasks.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from mtf_train.files import write_atomic

LANGS = ("en", "fr", "es", "zh", "ar", "hi", "sw")
DATASETS = LANGS + ("code",)
SEED = 2022
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # BLOOM's order: unk 0, bos 1, eos 2, pad 3
VOCAB_SIZE = 3000

# One parallel phrase list for the translation prompts (index i is the same sentence in every language).
PHRASES = {
    "en": ["The cat sleeps on the chair.", "I drink water every morning.", "The school is near the market.",
           "We are reading a new book.", "It is raining today.", "My brother plays football.",
           "The market opens at eight.", "She writes a letter to her friend.", "The food is very tasty.",
           "Where is the train station?", "The children are playing in the garden.", "I like green tea."],
    "fr": ["Le chat dort sur la chaise.", "Je bois de l'eau chaque matin.", "L'école est près du marché.",
           "Nous lisons un nouveau livre.", "Il pleut aujourd'hui.", "Mon frère joue au football.",
           "Le marché ouvre à huit heures.", "Elle écrit une lettre à son amie.", "La nourriture est très bonne.",
           "Où est la gare ?", "Les enfants jouent dans le jardin.", "J'aime le thé vert."],
    "es": ["El gato duerme en la silla.", "Bebo agua cada mañana.", "La escuela está cerca del mercado.",
           "Estamos leyendo un libro nuevo.", "Hoy está lloviendo.", "Mi hermano juega al fútbol.",
           "El mercado abre a las ocho.", "Ella escribe una carta a su amiga.", "La comida está muy rica.",
           "¿Dónde está la estación de tren?", "Los niños juegan en el jardín.", "Me gusta el té verde."],
    "zh": ["猫在椅子上睡觉。", "我每天早上喝水。", "学校在市场附近。", "我们在读一本新书。", "今天下雨了。",
           "我的哥哥踢足球。", "市场八点开门。", "她给朋友写了一封信。", "这食物很好吃。", "火车站在哪里？",
           "孩子们在花园里玩。", "我喜欢绿茶。"],
    "ar": ["القطة تنام على الكرسي.", "أشرب الماء كل صباح.", "المدرسة قريبة من السوق.", "نحن نقرأ كتابا جديدا.",
           "إنها تمطر اليوم.", "أخي يلعب كرة القدم.", "يفتح السوق في الساعة الثامنة.", "هي تكتب رسالة إلى صديقتها.",
           "الطعام لذيذ جدا.", "أين محطة القطار؟", "الأطفال يلعبون في الحديقة.", "أحب الشاي الأخضر."],
    "hi": ["बिल्ली कुर्सी पर सोती है।", "मैं हर सुबह पानी पीता हूँ।", "स्कूल बाज़ार के पास है।",
           "हम एक नई किताब पढ़ रहे हैं।", "आज बारिश हो रही है।", "मेरा भाई फ़ुटबॉल खेलता है।",
           "बाज़ार आठ बजे खुलता है।", "वह अपनी दोस्त को पत्र लिखती है।", "खाना बहुत स्वादिष्ट है।",
           "रेलवे स्टेशन कहाँ है?", "बच्चे बगीचे में खेल रहे हैं।", "मुझे हरी चाय पसंद है।"],
    "sw": ["Paka analala kwenye kiti.", "Ninakunywa maji kila asubuhi.", "Shule iko karibu na soko.",
           "Tunasoma kitabu kipya.", "Leo kunanyesha mvua.", "Kaka yangu anacheza mpira wa miguu.",
           "Soko linafunguliwa saa mbili asubuhi.", "Anamwandikia rafiki yake barua.", "Chakula ni kitamu sana.",
           "Kituo cha treni kiko wapi?", "Watoto wanacheza bustanini.", "Ninapenda chai ya kijani."],
}

# Per-language templates. {n} name, {i} item (plural), {a}/{b} numbers, {p} product, {adj} adjective, {l} list.
LEX = {
    "en": dict(
        names=["Anna", "Peter", "Sofia", "Liam", "Grace"], items=["apples", "books", "pencils", "oranges", "cards"],
        add=["{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?",
             "Question: {n} had {a} {i}. A friend gave {n} {b} more. How many {i} does {n} have?\nAnswer:"],
        sub=["{n} had {a} {i} and gave away {b}. How many {i} are left?"],
        products=["phone", "book", "restaurant", "movie", "chair"],
        pos=["excellent", "great", "wonderful", "very good"], neg=["terrible", "bad", "disappointing", "broken"],
        review=["The {p} is {adj}.", "I think this {p} is {adj}."],
        senti=["Review: {r}\nIs this review positive or negative?", "{r} Did the writer like it? Answer positive or negative."],
        labels=("positive", "negative"),
        largest=["Which number is the largest: {l}?"], smallest=["Find the smallest number in the list {l}."],
        translate="Translate to English: {s}"),
    "fr": dict(
        names=["Marie", "Pierre", "Sophie", "Luc", "Claire"], items=["pommes", "livres", "crayons", "oranges", "cartes"],
        add=["{n} a {a} {i} et en achète {b} de plus. Combien de {i} a {n} maintenant ?",
             "Question : {n} avait {a} {i}. Un ami lui en donne {b}. Combien de {i} a {n} ?\nRéponse :"],
        sub=["{n} avait {a} {i} et en a donné {b}. Combien de {i} reste-t-il ?"],
        products=["téléphone", "livre", "restaurant", "film", "fauteuil"],
        pos=["excellent", "génial", "magnifique", "très bon"], neg=["terrible", "mauvais", "décevant", "cassé"],
        review=["Le {p} est {adj}.", "Je trouve que ce {p} est {adj}."],
        senti=["Avis : {r}\nCet avis est-il positif ou négatif ?"],
        labels=("positif", "négatif"),
        largest=["Quel est le plus grand nombre : {l} ?"], smallest=["Trouve le plus petit nombre de la liste {l}."],
        translate="Traduire en français : {s}"),
    "es": dict(
        names=["María", "Juan", "Lucía", "Carlos", "Elena"], items=["libros", "lápices", "platos", "vasos", "juguetes"],
        add=["{n} tiene {a} {i} y compra {b} más. ¿Cuántos {i} tiene {n} ahora?",
             "Pregunta: {n} tenía {a} {i}. Un amigo le da {b} más. ¿Cuántos {i} tiene {n}?\nRespuesta:"],
        sub=["{n} tenía {a} {i} y regaló {b}. ¿Cuántos {i} le quedan?"],
        products=["teléfono", "libro", "restaurante", "coche", "sillón"],
        pos=["excelente", "genial", "maravilloso", "muy bueno"], neg=["terrible", "malo", "decepcionante", "roto"],
        review=["El {p} es {adj}.", "Creo que este {p} es {adj}."],
        senti=["Reseña: {r}\n¿Esta reseña es positiva o negativa?"],
        labels=("positiva", "negativa"),
        largest=["¿Cuál es el número más grande: {l}?"], smallest=["Encuentra el número más pequeño de la lista {l}."],
        translate="Traduce al español: {s}"),
    "zh": dict(
        names=["小明", "小红", "李华", "王芳", "张伟"], items=["个苹果", "本书", "支铅笔", "个橘子", "张卡片"],
        add=["{n}有{a}{i}，又买了{b}{i}。{n}现在一共有多少？", "问题：{n}原来有{a}{i}，朋友又给了{b}{i}。{n}有多少？\n答案："],
        sub=["{n}有{a}{i}，送给朋友{b}{i}。还剩多少？"],
        products=["手机", "书", "电影", "椅子", "餐厅"],
        pos=["非常好", "很棒", "质量很好", "让人满意"], neg=["很差", "太糟糕了", "让人失望", "坏了"],
        review=["这个{p}{adj}。", "我觉得这个{p}{adj}。"],
        senti=["评论：{r}\n这条评论是正面的还是负面的？"],
        labels=("正面", "负面"),
        largest=["下面哪个数字最大：{l}？"], smallest=["找出列表{l}中最小的数字。"],
        translate="翻译成中文：{s}"),
    "ar": dict(
        names=["أحمد", "فاطمة", "عمر", "ليلى", "يوسف"], items=["تفاحات", "كتب", "أقلام", "برتقالات", "بطاقات"],
        add=["لدى {n} {a} {i} واشترى {b} أخرى. كم عدد {i} لدى {n} الآن؟",
             "سؤال: كان لدى {n} {a} {i} وأعطاه صديق {b} أخرى. كم عدد {i} لدى {n}؟\nالجواب:"],
        sub=["كان لدى {n} {a} {i} وأعطى {b} منها. كم بقي؟"],
        products=["الهاتف", "الكتاب", "المطعم", "الفيلم", "الكرسي"],
        pos=["ممتاز", "رائع", "جيد جدا", "جميل"], neg=["سيئ", "مخيب للآمال", "مكسور", "رديء"],
        review=["{p} {adj}.", "أعتقد أن {p} {adj}."],
        senti=["المراجعة: {r}\nهل هذه المراجعة إيجابية أم سلبية؟"],
        labels=("إيجابية", "سلبية"),
        largest=["ما هو أكبر عدد: {l}؟"], smallest=["أوجد أصغر عدد في القائمة {l}."],
        translate="ترجم إلى العربية: {s}"),
    "hi": dict(
        names=["राम", "सीता", "अमित", "प्रिया", "राहुल"], items=["सेब", "किताबें", "पेंसिलें", "संतरे", "कार्ड"],
        add=["{n} के पास {a} {i} हैं और {n} {b} और खरीदता है। अब {n} के पास कितने {i} हैं?",
             "प्रश्न: {n} के पास {a} {i} थे। एक दोस्त ने {b} और दिए। {n} के पास कितने {i} हैं?\nउत्तर:"],
        sub=["{n} के पास {a} {i} थे और {n} ने {b} दे दिए। अब कितने {i} बचे हैं?"],
        products=["फ़ोन", "किताब", "रेस्टोरेंट", "फ़िल्म", "कुर्सी"],
        pos=["बहुत अच्छा", "शानदार", "बेहतरीन", "अच्छा"], neg=["बहुत खराब", "बेकार", "निराशाजनक", "टूटा हुआ"],
        review=["यह {p} {adj} है।", "मेरे हिसाब से यह {p} {adj} है।"],
        senti=["समीक्षा: {r}\nक्या यह समीक्षा सकारात्मक है या नकारात्मक?"],
        labels=("सकारात्मक", "नकारात्मक"),
        largest=["इनमें से सबसे बड़ी संख्या कौन सी है: {l}?"], smallest=["सूची {l} में सबसे छोटी संख्या बताइए।"],
        translate="हिंदी में अनुवाद करें: {s}"),
    "sw": dict(
        names=["Juma", "Amina", "Baraka", "Neema", "Hassan"], items=["machungwa", "vitabu", "kalamu", "maembe", "kadi"],
        add=["{n} ana {i} {a} na ananunua {b} zaidi. {n} ana {i} ngapi sasa?",
             "Swali: {n} alikuwa na {i} {a}. Rafiki akampa {b} zaidi. {n} ana {i} ngapi?\nJibu:"],
        sub=["{n} alikuwa na {i} {a} na akatoa {b}. Zimebaki ngapi?"],
        products=["simu", "kitabu", "mgahawa", "filamu", "kiti"],
        pos=["nzuri sana", "bora", "ya kupendeza", "safi"], neg=["mbaya", "mbaya sana", "ya kukatisha tamaa", "imevunjika"],
        review=["{p} hii ni {adj}.", "Nadhani {p} hii ni {adj}."],
        senti=["Maoni: {r}\nJe, maoni haya ni chanya au hasi?"],
        labels=("chanya", "hasi"),
        largest=["Ni namba ipi kubwa zaidi: {l}?"], smallest=["Tafuta namba ndogo zaidi katika orodha {l}."],
        translate="Tafsiri kwa Kiswahili: {s}"),
}
LIST_SEP = {"zh": "、", "ar": "، "}


def _arithmetic(lx: dict, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        name, item = rng.choice(lx["names"]), rng.choice(lx["items"])
        a, b = rng.randint(2, 60), rng.randint(1, 40)
        if rng.random() < 0.6:
            text, answer = rng.choice(lx["add"]), a + b
        else:
            a, b = max(a, b) + 1, min(a, b)
            text, answer = rng.choice(lx["sub"]), a - b
        rows.append({"inputs": text.format(n=name, i=item, a=a, b=b), "targets": str(answer)})
    return rows


def _sentiment(lx: dict, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        review = rng.choice(lx["review"]).format(p=rng.choice(lx["products"]),
                                                 adj=rng.choice(lx["pos"] if good else lx["neg"]))
        rows.append({"inputs": rng.choice(lx["senti"]).format(r=review), "targets": lx["labels"][0 if good else 1]})
    return rows


def _extremes(lang: str, lx: dict, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        listed = LIST_SEP.get(lang, ", ").join(map(str, nums))
        if rng.random() < 0.5:
            rows.append({"inputs": rng.choice(lx["largest"]).format(l=listed), "targets": str(max(nums))})
        else:
            rows.append({"inputs": rng.choice(lx["smallest"]).format(l=listed), "targets": str(min(nums))})
    return rows


def _translation(lang: str, lx: dict) -> list[dict]:
    return [{"inputs": lx["translate"].format(s=PHRASES[src][i]), "targets": PHRASES[lang][i]}
            for src in LANGS if src != lang for i in range(len(PHRASES[lang]))]


_OPS = [  # name, English description, Python expression, JavaScript expression
    ("add_{k}", "its argument plus {k}", "x + {k}", "x + {k}"),
    ("times_{k}", "its argument multiplied by {k}", "x * {k}", "x * {k}"),
    ("minus_{k}", "its argument minus {k}", "x - {k}", "x - {k}"),
    ("is_multiple_of_{k}", "whether its argument is a multiple of {k}", "x % {k} == 0", "x % {k} === 0"),
    ("square_plus_{k}", "the square of its argument plus {k}", "x * x + {k}", "x * x + {k}"),
]


def _code(rng: random.Random, n: int) -> dict[str, list[dict]]:
    write, run, explain = [], [], []
    for _ in range(n):
        name, desc, py, js = rng.choice(_OPS)
        k = rng.randint(1, 40)
        fn = name.format(k=k)
        if rng.random() < 0.7:
            write.append({"inputs": f"Write a Python function `{fn}(x)` that returns {desc.format(k=k)}.",
                          "targets": f"def {fn}(x):\n    return {py.format(k=k)}"})
        else:
            write.append({"inputs": f"Write a JavaScript function `{fn}(x)` that returns {desc.format(k=k)}.",
                          "targets": f"function {fn}(x) {{\n  return {js.format(k=k)};\n}}"})
        x = rng.randint(0, 20)
        expr = py.format(k=k)
        value = eval(expr, {}, {"x": x})  # our own generated arithmetic, not input
        run.append({"inputs": f"What does this Python code print?\n\ndef {fn}(x):\n    return {expr}\n\nprint({fn}({x}))",
                    "targets": str(value)})
        explain.append({"inputs": f"Explain in one sentence what this function does.\n\ndef {fn}(x):\n    return {expr}",
                        "targets": f"It returns {desc.format(k=k)}."})
    return {"write_function": write, "predict_output": run, "explain_function": explain}


def generate_rows(seed: int = SEED, rows: int = 100) -> dict[str, dict[str, list[dict]]]:
    """dataset -> task -> rows. `rows` per templated task (translation has a fixed size)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for lang in LANGS:
        lx = LEX[lang]
        rng = random.Random(f"{seed}-{lang}")
        out[lang] = {
            "arithmetic": _arithmetic(lx, rng, rows),
            "sentiment": _sentiment(lx, rng, rows),
            "extremes": _extremes(lang, lx, rng, rows),
            "translation": _translation(lang, lx),
        }
    out["code"] = _code(random.Random(f"{seed}-code"), rows)
    return out


def write_jsonl(out_dir: str | Path, seed: int = SEED, rows: int = 100) -> dict[str, Path]:
    """Write jsonl/<dataset>/<task>.jsonl; returns dataset -> its folder."""
    root = Path(out_dir) / "jsonl"
    folders = {}
    for ds, tasks in generate_rows(seed, rows).items():
        folder = root / ds
        folder.mkdir(parents=True, exist_ok=True)
        for task, items in tasks.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
            (folder / f"{task}_{ds}.jsonl").write_text(text, encoding="utf-8")
        folders[ds] = folder
    return folders


def train_tokenizer(jsonl_files: list[Path], out_dir: str | Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """A byte-level BPE over the rows' text (targets with their leading space, as they are tokenized)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for f in sorted(jsonl_files):
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["inputs"], " " + row["targets"]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, "unk_token": "<unk>",
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_prefix_space": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def build_sample(out_dir: str | Path, *, seed: int = SEED, rows: int = 100, train_tok: bool = True,
                 progress: bool = False) -> list:
    """Everything under `out_dir`: jsonl, tokenizer, and the indexed datasets xp3_<dataset>_*."""
    from mtf_train.data.preprocess import preprocess

    out = Path(out_dir)
    folders = write_jsonl(out, seed, rows)
    tok_dir = out / "tokenizer"
    if train_tok or not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(sorted(out.glob("jsonl/*/*.jsonl")), tok_dir)
    results = []
    for ds, folder in folders.items():
        # The 2022 step per language: merge the prompt files, `sort -u | shuf`, tokenize.
        results.append(preprocess([str(folder)], str(out / f"xp3_{ds}"), str(tok_dir), workers=0, dedup=True,
                                  shuffle=True, seed=seed, progress=progress))
    write_eval_sample(out, seed)
    return results


# --- the held-out evaluation sample (`mtf-train eval --data-dir data/sample/eval`) ------------------------------
#
# A few rows per task family and language, in each family's published schema and split file, for the sample's
# languages that the family was published in. The items are new lists of numbers under the sample's own
# "largest / smallest number" questions (never a training row: training inputs are excluded), and the answer
# choices are numbers of the list, so a model that learned the sample's number-comparison task ranks the right
# one first, while an untrained one is at chance. XNLI's answers are fixed English words ("True", "Yes", ...)
# that the training sample never teaches: a model trained on it alone stays at chance there.

EVAL_LANGS = {"xcopa": ("sw", "zh"), "xnli": LANGS, "xstorycloze": ("ar", "en", "es", "hi", "sw", "zh"),
              "xwinograd": ("en", "fr", "zh")}
# Rows per language. XNLI stays at chance on this sample (its answers are label words the training sample never
# teaches) and is half of the evaluation's requests at 40 rows: 24 (8 per label) keep it cheap.
EVAL_ROWS = {"xcopa": 40, "xnli": 24, "xstorycloze": 40, "xwinograd": 40}


def _extreme_item(lang: str, lx: dict, rng: random.Random, seen: set[str], largest: bool) -> tuple[str, str, str]:
    """(question, right number, another number of the list), the question unseen in training."""
    while True:
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        listed = LIST_SEP.get(lang, ", ").join(map(str, nums))
        question = rng.choice(lx["largest" if largest else "smallest"]).format(l=listed)
        if question not in seen:
            seen.add(question)
            break
    right = max(nums) if largest else min(nums)
    return question, str(right), str(rng.choice([n for n in nums if n != right]))


def eval_rows(seed: int = SEED, rows: dict[str, int] | int = EVAL_ROWS) -> dict[str, dict[str, list[dict]]]:
    """family -> language -> rows in the family's published schema. Labels are balanced: half of the rows ask
    for the largest number, half for the smallest, and the right choice is first in half of them."""
    train = generate_rows(seed)
    out: dict[str, dict[str, list[dict]]] = {}
    for family, langs in EVAL_LANGS.items():
        for lang in langs:
            lx = LEX[lang]
            rng = random.Random(f"{seed}-eval-{family}-{lang}")
            seen = {r["inputs"] for r in train[lang]["extremes"]}
            items = []
            for i in range(rows[family] if isinstance(rows, dict) else rows):
                question, right, wrong = _extreme_item(lang, lx, rng, seen, largest=i % 2 == 0)
                first = (i // 2) % 2 == 0
                a, b = (right, wrong) if first else (wrong, right)
                if family == "xcopa":
                    items.append({"premise": question, "choice1": a, "choice2": b, "question": "effect",
                                  "label": 0 if first else 1, "idx": i, "changed": False})
                elif family == "xstorycloze":
                    story = rng.sample(PHRASES[lang], 3)
                    items.append({"story_id": f"mtf-sample-{lang}-{i:03d}", "input_sentence_1": story[0],
                                  "input_sentence_2": story[1], "input_sentence_3": story[2],
                                  "input_sentence_4": question, "sentence_quiz1": a, "sentence_quiz2": b,
                                  "answer_right_ending": 1 if first else 2})
                elif family == "xwinograd":
                    items.append({"sentence": f"{question} _", "option1": a, "option2": b,
                                  "answer": "1" if first else "2"})
                else:  # xnli: entailment (the right number), neutral (an unrelated sentence), contradiction
                    label = i % 3
                    hypothesis = {0: right, 1: rng.choice(PHRASES[lang]), 2: wrong}[label]
                    items.append({"premise": question, "hypothesis": hypothesis, "label": label})
            rng.shuffle(items)
            out.setdefault(family, {})[lang] = items
    return out


def write_eval_sample(out_dir: str | Path, seed: int = SEED, rows: dict[str, int] | int = EVAL_ROWS) -> list[Path]:
    """eval/<family>/<lang>/<split>.jsonl, the split each family is evaluated on (mtf_train.eval.tasks)."""
    from mtf_train.eval.tasks import FAMILIES

    written = []
    for family, langs in eval_rows(seed, rows).items():
        for lang, items in langs.items():
            path = Path(out_dir) / "eval" / family / lang / f"{FAMILIES[family].split}.jsonl"
            write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
            written.append(path)
    return written
