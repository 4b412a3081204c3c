"""Write the shipped LongBench-E fixture: ``{dataset}_e.jsonl`` in the official format.

The documents are fictional encyclopedia entries (towns, people, ships, inventions) built from a
seeded table of facts; each question asks for one fact stated in the context, so a model that reads
the context can answer. Fields and conventions follow THUDM/LongBench's LongBench-E files: ``input,
context, answers, length (words of the context), dataset, language, all_classes, _id``. Re-run with
``python data/longbench_e/make_fixture.py``; the output is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOWNS = [
    ("Varnholm", "Edda Kallin", "1723", "shipbuilding", "the Liss River", "copper bells"),
    ("Oristade", "Marius Pell", "1655", "glassmaking", "Lake Vennor", "blue lanterns"),
    ("Kestrelby", "Anja Sorvik", "1811", "salt mining", "the Dune Coast", "wooden kites"),
    ("Talmoor", "Hugo Brandt", "1590", "wool weaving", "the Grey Hills", "honey cakes"),
    ("Pellanor", "Sofia Ruell", "1742", "clock making", "the Amber Valley", "pocket watches"),
    ("Drummere", "Oskar Veld", "1698", "fishing", "the Cold Sound", "smoked herring"),
    ("Lindqvist Bay", "Ilse Marr", "1777", "paper milling", "the Tarn Estuary", "rag paper"),
    ("Corvanne", "Tomas Erling", "1624", "stone carving", "Mount Halden", "granite lions"),
]
FILLER = [
    "The climate is mild in summer and wet in autumn, and most houses are built of local timber.",
    "A weekly market is held in the central square, where farmers from nearby villages sell produce.",
    "The old road to the coast was paved in the nineteenth century and is still used by carts.",
    "Several chapels stand along the main street; the oldest has a bell tower with a slate roof.",
    "Children attend a small school near the harbour, and a library opens three afternoons a week.",
    "Travellers often remark on the quiet evenings and the smell of wood smoke in winter.",
    "The town council meets in a converted granary that also houses a small museum of tools.",
    "Local legend tells of a fox that guided lost sailors home during a great storm.",
]


def town_article(t: tuple[str, ...], rng: random.Random, n_filler: int) -> str:
    name, founder, year, trade, water, product = t
    facts = [
        f"{name} is a town that lies on {water}.",
        f"{name} was founded in {year} by {founder}.",
        f"For centuries the main trade of {name} has been {trade}.",
        f"Today {name} is best known for its {product}, which are sold across the region.",
    ]
    filler = [rng.choice(FILLER) for _ in range(n_filler)]
    body = facts[:2] + filler[: n_filler // 2] + facts[2:] + filler[n_filler // 2 :]
    return " ".join(body)


def record(dataset: str, input_: str, context: str, answers: list[str], all_classes=None) -> dict:
    _id = hashlib.sha256(f"{dataset}|{input_}|{context}".encode()).hexdigest()[:48]
    return {
        "input": input_,
        "context": context,
        "answers": answers,
        "length": len(context.split()),
        "dataset": dataset,
        "language": "en",
        "all_classes": all_classes,
        "_id": _id,
    }


def build() -> dict[str, list[dict]]:
    rng = random.Random(20261125)
    out: dict[str, list[dict]] = {}

    # multi-document QA (hotpotqa / 2wikimqa style): "Passage k:" blocks, one holds the answer
    hot = []
    for q, ans, order in [
        ("Who founded the town of Varnholm?", "Edda Kallin", [0, 1, 2, 3, 5]),  # answer in passage 1
        ("In which year was Pellanor founded?", "1742", [1, 2, 4, 5, 6]),  # answer in passage 3
    ]:
        passages = [f"Passage {k + 1}:\n{TOWNS[j][0]}\n{town_article(TOWNS[j], rng, 6)}" for k, j in enumerate(order)]
        hot.append(record("hotpotqa", q, "\n\n".join(passages), [ans]))
    out["hotpotqa"] = hot

    wiki = []
    for q, ans, j in [("What is the main trade of Kestrelby?", "salt mining", 2), ("On which lake does Oristade lie?", "Lake Vennor", 1)]:
        order = [j] + [k for k in (3, 5, 6, 7) if k != j]
        rng.shuffle(order)
        passages = [f"Passage {k + 1}:\n{TOWNS[m][0]}\n{town_article(TOWNS[m], rng, 5)}" for k, m in enumerate(order)]
        wiki.append(record("2wikimqa", q, "\n\n".join(passages), [ans]))
    out["2wikimqa"] = wiki

    # single-document QA
    mf = []
    for q, ans, j in [("What is Talmoor best known for today?", "honey cakes", 3), ("Who founded Drummere?", "Oskar Veld", 5)]:
        mf.append(record("multifieldqa_en", q, town_article(TOWNS[j], rng, 30), [ans]))
    out["multifieldqa_en"] = mf

    paper = (
        "Abstract. We study the Halden corpus, a collection of 12,400 letters written by lighthouse keepers "
        "between 1850 and 1910. We train a sentence classifier on 3,000 annotated letters and report an "
        "accuracy of 87 percent on a held-out test set of 500 letters. "
        "1 Introduction. Letters from remote stations are a rich source on daily life. " + " ".join(rng.choice(FILLER) for _ in range(12)) +
        " 2 Data. The letters were transcribed by volunteers of the Tarn Historical Society. The annotation "
        "scheme has four labels: weather, supplies, ships and family. 3 Model. We fine-tune a small "
        "transformer encoder for three epochs with a learning rate of 0.0001. 4 Results. The classifier "
        "reaches 87 percent accuracy; the weather label is the easiest and the family label the hardest."
    )
    out["qasper"] = [
        record("qasper", "How many letters are in the Halden corpus?", paper, ["12,400 letters", "12,400"]),
        record("qasper", "Who transcribed the letters?", paper, ["volunteers of the Tarn Historical Society"]),
    ]

    # few-shot QA (triviaqa): context holds solved examples, input the new passage + question
    shots = "\n\n".join(
        f"Passage: {town_article(t, rng, 2)}\nQuestion: Who founded {t[0]}?\nAnswer: {t[1]}" for t in TOWNS[:3]
    )
    out["triviaqa"] = [
        record("triviaqa", f"Passage: {town_article(TOWNS[7], rng, 2)}\nQuestion: Who founded {TOWNS[7][0]}?\nAnswer:", shots, [TOWNS[7][1]]),
        record("triviaqa", f"Passage: {town_article(TOWNS[6], rng, 2)}\nQuestion: Who founded {TOWNS[6][0]}?\nAnswer:", shots, [TOWNS[6][1]]),
    ]

    # classification (trec): labelled questions as examples
    classes = ["Location", "Individual", "Date", "Number"]
    examples = [
        ("Where is the town of Varnholm?", "Location"), ("Who founded Oristade?", "Individual"),
        ("When was Kestrelby founded?", "Date"), ("How many bells hang in the Talmoor chapel?", "Number"),
        ("Where does the Liss River end?", "Location"), ("Who built the first clock in Pellanor?", "Individual"),
    ]
    ctx = "\n".join(f"Question: {q}\nType: {c}" for q, c in examples)
    out["trec"] = [
        record("trec", "Question: Who was the first mayor of Drummere?\nType:", ctx, ["Individual"], classes),
        record("trec", "Question: When did the great storm hit Corvanne?\nType:", ctx, ["Date"], classes),
    ]

    # passage retrieval / count
    paras = [town_article(t, rng, 2) for t in TOWNS[:6]]
    out["passage_retrieval_en"] = [
        record(
            "passage_retrieval_en",
            f"{TOWNS[3][0]} is a wool-weaving town in the Grey Hills founded by {TOWNS[3][1]} and known for honey cakes.",
            "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paras)),
            ["Paragraph 4"],
        )
    ]
    dup = [paras[0], paras[1], paras[0], paras[2], paras[1]]
    out["passage_count"] = [
        record("passage_count", "", "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(dup)), ["3"])
    ]

    # summarisation (rouge): dialogue few-shot
    dialog = "Anna: Are you coming to the market in Varnholm tomorrow?\nBen: Yes, I need copper bells for the shop.\nAnna: Great, let's meet at nine by the square."
    out["samsum"] = [
        record(
            "samsum",
            f"Dialogue: {dialog}\nSummary: ",
            "Dialogue: Carl: I lost my keys.\nDora: Check the car.\nSummary: Carl lost his keys and Dora suggests checking the car.",
            ["Anna and Ben will meet at nine by the square at the Varnholm market, where Ben will buy copper bells."],
        )
    ]

    # code completion (lcc)
    code = (
        "def town_age(founded: int, year: int) -> int:\n"
        "    \"\"\"Years since a town was founded.\"\"\"\n"
        "    return year - founded\n\n\n"
        "def describe(name: str, founded: int, year: int) -> str:\n"
        "    age = town_age(founded, year)\n"
    )
    out["lcc"] = [record("lcc", "", code, ['    return f"{name} is {age} years old"'])]
    return out


def main() -> None:
    for dataset, rows in build().items():
        path = HERE / f"{dataset}_e.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path.name}: {len(rows)} records")


if __name__ == "__main__":
    main()
