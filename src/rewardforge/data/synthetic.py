"""A small, deterministic preference dataset with a learnable signal, for the quickstart and tests.

Each pair asks a question from a fixed set of topics. The chosen answer is on topic, correct and
polite; the rejected one is rude, a needless refusal, vague, or the answer to a different question.
A reward model should learn this quickly (>= 80% validation accuracy within one short run).
:func:`write` keeps the questions of the validation file out of the training file (:data:`VALIDATION_TOPICS`),
so its validation accuracy is measured on prompts the model never saw.

    python -m rewardforge.data.synthetic --out examples/quickstart
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = [
    ("How do I boil an egg?", "Place the egg in boiling water for about 9 minutes, then cool it in cold water before peeling."),
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("How can I improve my sleep?", "Keep a regular bedtime, avoid screens an hour before bed, and keep your bedroom dark and cool."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most, so the sky looks blue."),
    ("How do I reverse a list in Python?", "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy."),
    ("What causes tides?", "Tides are caused mainly by the Moon's gravity pulling on the oceans as the Earth rotates."),
    ("How do I make a budget?", "List your monthly income, track your expenses, set limits per category, and save a fixed share first."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("How do I remove a coffee stain?", "Blot the stain, rinse it with cold water, then apply a little dish soap and rinse again."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("How do I start running?", "Begin with short run-walk intervals three times a week and increase the running time gradually."),
    ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, like 7 or 13."),
    ("How do I water a cactus?", "Water a cactus deeply only when the soil is completely dry, usually every two to four weeks."),
    ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid, the molecule that carries genetic information."),
    ("How do I write a cover letter?", "Address the hiring manager, explain why you fit the role with one or two examples, and close politely."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a germ so the body can fight it quickly later."),
    ("How can I learn a new language?", "Practise a little every day, learn common words first, and speak with native speakers when you can."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level."),
    ("How do I change a flat tire?", "Loosen the nuts, jack up the car, swap in the spare tire, then tighten the nuts in a star pattern."),
    ("What is inflation?", "Inflation is the general rise in prices over time, which lowers what each unit of money can buy."),
    ("How do I make rice?", "Rinse one cup of rice, simmer it covered in two cups of water for about 18 minutes, then let it rest."),
    ("Why do leaves change color in autumn?", "Trees stop making green chlorophyll in autumn, revealing the yellow and red pigments in the leaves."),
    ("How do I back up my phone?", "Turn on the cloud backup in your phone's settings, or connect it to a computer and copy the files."),
    ("What is gravity?", "Gravity is the force by which masses attract each other; it keeps us on the ground and planets in orbit."),
    ("How do I care for a houseplant?", "Give it the right amount of light, water when the top soil is dry, and feed it during spring."),
    ("How do I calm down when anxious?", "Try slow breathing, counting four in and six out, and name five things you can see around you."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea, such as teacher, city or freedom."),
    ("How do I clean a cast iron pan?", "Rinse it with hot water, scrub with a brush, dry it fully, and rub in a thin layer of oil."),
    ("How far is the Moon?", "The Moon is about 384,000 kilometres from the Earth on average."),
    ("How do I prepare for an interview?", "Research the company, practise answers to common questions, and prepare a few questions of your own."),
]
OPENERS = ["", "Sure! ", "Good question. ", "Happy to help. ", "Here is a clear answer: "]
CLOSERS = ["", " I hope this helps.", " Let me know if you have more questions.", " Good luck!"]
RUDE = [
    "That is a stupid question. Figure it out yourself.",
    "Why would I waste my time on this? Go away.",
    "Ugh, everyone knows that. Stop asking dumb things.",
    "Not my problem. Search for it yourself.",
]
REFUSALS = [
    "I'm sorry, but I cannot help with that request.",
    "I am unable to answer questions like this one.",
    "As an AI, I cannot provide that information.",
]
VAGUE = ["It depends.", "Maybe, maybe not.", "There are many ways to think about it.", "Hard to say really.", "Things vary."]
PREFIXES = ["", "Hi! ", "Quick question: ", "Could you help me? ", "I was wondering, "]
# the questions only the validation files ask (every fifth): validation prompts are never training prompts
VALIDATION_TOPICS = tuple(range(0, len(TOPICS), 5))
TRAIN_TOPICS = tuple(i for i in range(len(TOPICS)) if i not in VALIDATION_TOPICS)


def generate(n: int, seed: int = 0, topics: tuple[int, ...] | None = None) -> list[dict]:
    """``n`` explicit-format pairs ``{"prompt", "chosen", "rejected", "subset"}``; the subset names the kind of
    rejection. ``topics``: the indices into :data:`TOPICS` the questions come from (default: all)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        qi = rng.choice(topics) if topics else rng.randrange(len(TOPICS))
        question, answer = TOPICS[qi]
        prompt = rng.choice(PREFIXES) + (question if not rng.random() < 0.5 else question[0].lower() + question[1:])
        if prompt[:1].islower():
            prompt = prompt[0].upper() + prompt[1:]
        chosen = rng.choice(OPENERS) + answer + rng.choice(CLOSERS)
        kind = rng.choice(["rude", "refusal", "vague", "off_topic"])
        if kind == "rude":
            rejected = rng.choice(RUDE)
        elif kind == "refusal":
            rejected = rng.choice(REFUSALS)
        elif kind == "vague":
            rejected = rng.choice(VAGUE)
        else:
            other = rng.choice([t for j, t in enumerate(TOPICS) if j != qi])[1]
            rejected = rng.choice(OPENERS) + other + rng.choice(CLOSERS)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": kind})
    return pairs


# the grade of each kind of response in a generated list (higher is better; refusal and vague tie)
LIST_GRADES = {"helpful": 3.0, "off_topic": 2.0, "refusal": 1.0, "vague": 1.0, "rude": 0.0}


def generate_lists(n: int, seed: int = 0, k: int = 4, topics: tuple[int, ...] | None = None) -> list[dict]:
    """``n`` list rows ``{"prompt", "responses", "scores", "kinds"}`` of ``k`` (2..5) responses each: a helpful
    answer and ``k - 1`` distinct other kinds, shuffled, scored by :data:`LIST_GRADES` (refusal and vague
    tie at 1: ties are kept as ties). For ``model.reward_model_type=listwise``. ``topics`` as :func:`generate`.

    Example:
        >>> row = generate_lists(1, k=3)[0]
        >>> len(row["responses"]), sorted(row["scores"])[-1]
        (3, 3.0)
    """
    if not 2 <= k <= len(LIST_GRADES):
        raise ValueError(f"k must be in 2..{len(LIST_GRADES)}, got {k}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        qi = rng.choice(topics) if topics else rng.randrange(len(TOPICS))
        question, answer = TOPICS[qi]
        prompt = rng.choice(PREFIXES) + question
        kinds = ["helpful"] + rng.sample([x for x in LIST_GRADES if x != "helpful"], k - 1)
        rng.shuffle(kinds)
        text = {
            "helpful": rng.choice(OPENERS) + answer + rng.choice(CLOSERS),
            "off_topic": rng.choice(OPENERS) + rng.choice([t for j, t in enumerate(TOPICS) if j != qi])[1],
            "refusal": rng.choice(REFUSALS), "vague": rng.choice(VAGUE), "rude": rng.choice(RUDE),
        }
        rows.append({"prompt": prompt, "responses": [text[x] for x in kinds], "scores": [LIST_GRADES[x] for x in kinds],
                     "kinds": kinds})
    return rows


def write(out_dir: str | Path, n_train: int = 1000, n_validation: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write :func:`generate` pairs to ``out_dir/train.jsonl`` and ``out_dir/validation.jsonl``, the validation
    questions (:data:`VALIDATION_TOPICS`) held out of training."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s, topics in (("train", n_train, seed, TRAIN_TOPICS), ("validation", n_validation, seed + 1, VALIDATION_TOPICS)):
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in generate(n, s, topics)))
        paths.append(p)
    return paths[0], paths[1]


def write_lists(out_dir: str | Path, n_train: int = 300, n_validation: int = 60, seed: int = 0, k: int = 4) -> tuple[Path, Path]:
    """Write :func:`generate_lists` rows to ``out_dir/train.jsonl`` and ``out_dir/validation.jsonl``, the
    validation questions held out of training as in :func:`write`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s, topics in (("train", n_train, seed, TRAIN_TOPICS), ("validation", n_validation, seed + 1, VALIDATION_TOPICS)):
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in generate_lists(n, s, k, topics)))
        paths.append(p)
    return paths[0], paths[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/quickstart")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--validation", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in write(a.out, a.train, a.validation, a.seed):
        print(p)


if __name__ == "__main__":
    main()
