"""Write the bundled contrastive pair sets in steerkit/data/*.jsonl and the condition sets in
steerkit/data/conditions/*.jsonl (seeded; rerun to rebuild them).

Pair sets: {"positive": ..., "negative": ..., "split": "train" | "test"}; every fifth pair is held out.
Condition sets: {"text": ..., "label": 1 | 0, "split": "train" | "val" | "test"} (3 : 1 : 1).
Run: .venv/bin/python scripts/make_pair_sets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from steerkit._io import write_text

OUT = Path(__file__).resolve().parents[1] / "steerkit" / "data"

TOPICS = [
    "my first day at the new job",
    "the weekend trip to the coast",
    "my grandmother's birthday dinner",
    "the letter that arrived this morning",
    "our team's last football match",
    "the garden after the storm",
    "the exam results",
    "moving into the new apartment",
    "the concert last night",
    "my sister's wedding",
    "the walk home from school",
    "the old photographs in the attic",
    "the first snow of the winter",
    "the job interview",
    "the train journey across the country",
    "the dog we adopted",
    "the painting I finished",
    "the holiday by the lake",
    "our anniversary dinner",
    "the science fair",
    "the call from my best friend",
    "the cake I baked",
    "the hike up the mountain",
    "the first day of spring",
    "my brother's graduation",
    "the surprise party",
    "the new bicycle",
    "the bookshop on the corner",
    "the song on the radio",
    "the village festival",
    "the piano recital",
    "the road trip with my cousins",
    "the picnic in the park",
    "the results of the election",
    "the neighbour's new puppy",
    "the morning at the market",
    "the last day of summer camp",
    "the flight home",
    "our family reunion",
    "the play at the theatre",
    "the visit to the museum",
    "the first time I rode a horse",
    "the new baby in the family",
    "the fishing trip",
    "the football final",
    "the letter from my pen pal",
    "the sunrise over the sea",
    "the quiet evening at home",
    "the bake sale",
    "the camping weekend",
    "the chess tournament",
    "the language class",
    "the new recipe I tried",
    "the swimming lesson",
    "the ski trip",
    "the school reunion",
    "the gift from my uncle",
    "the walk in the forest",
    "my daughter's first steps",
    "the ferry ride",
    "the lantern parade",
    "the harvest at the farm",
    "the dance class",
    "the road to the old house",
    "the trip to the zoo",
    "the Sunday breakfast",
    "the bus ride into town",
    "the choir rehearsal",
    "the beach bonfire",
    "the letter from the university",
]
JOY = ["overjoyed", "delighted", "thrilled", "so happy", "full of joy", "elated", "grateful and glad", "ecstatic"]
MISERY = ["miserable", "heartbroken", "devastated", "so unhappy", "full of despair", "wretched", "crushed", "gloomy"]
OPENERS = [
    "Thinking about {t}, I feel {f}",
    "When I remember {t}, I am {f}",
    "Honestly, {t} left me {f}",
    "Looking back on {t}, I felt {f}",
    "Today, talking about {t}, I'm {f}",
]


def sentiment(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for i, topic in enumerate(TOPICS):
        opener = OPENERS[i % len(OPENERS)]
        pairs.append((opener.format(t=topic, f=rng.choice(JOY)), opener.format(t=topic, f=rng.choice(MISERY))))
    return pairs


CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Chile", "Santiago"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Cuba", "Havana"),
    ("Thailand", "Bangkok"),
    ("Argentina", "Buenos Aires"),
    ("Hungary", "Budapest"),
    ("Denmark", "Copenhagen"),
    ("Turkey", "Ankara"),
    ("India", "New Delhi"),
    ("Mexico", "Mexico City"),
    ("Australia", "Canberra"),
    ("Belgium", "Brussels"),
    ("Iran", "Tehran"),
    ("Vietnam", "Hanoi"),
]
FILLER = [
    "That is a great question, and it is worth taking a moment to think it through carefully before answering.",
    "Let me start by restating the question so that we are both clear about what is being asked here.",
    "There are a few different ways to approach this, so I will walk through my reasoning step by step.",
    "Before giving the final answer, it helps to consider some background and context that might be relevant.",
]


def concise(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for country, capital in CAPITALS:
        q = f"Question: What is the capital of {country}?\nAnswer:"
        verbose = (
            f" {rng.choice(FILLER)} {country} is a country with a long history, many cities and regions, "
            f"and its government sits in one of them. After considering all of this, the capital of "
            f"{country} is {capital}."
        )
        pairs.append((f"{q} {capital}.", f"{q}{verbose}"))
    for a, b in rng.sample([(a, b) for a in range(2, 61) for b in range(2, 61)], 40):
        q = f"Question: What is {a} plus {b}?\nAnswer:"
        verbose = (
            f" {rng.choice(FILLER)} We need to add {a} and {b}. Adding numbers means combining the two "
            f"quantities into one total. If we start at {a} and count up by {b}, we reach {a + b}. "
            f"So, after working through it, the answer is {a + b}."
        )
        pairs.append((f"{q} {a + b}.", f"{q}{verbose}"))
    rng.shuffle(pairs)
    return pairs


NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Grace", "Ivan", "Lena", "Kofi", "Nina"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "stamps", "shells", "cards"]


def reasoning(rng: random.Random) -> list[tuple[str, str]]:
    pairs, seen = [], set()
    while len(pairs) < 80:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(5, 40), rng.randint(2, 20), rng.randint(1, 5)
        if (name, item, a, b, c) in seen:
            continue
        seen.add((name, item, a, b, c))
        q = (
            f"Question: {name} has {a} {item}, buys {b} more, then gives away {c}. "
            f"How many {item} does {name} have now?\nSolution:"
        )
        good = f" {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
        kind = rng.randrange(3)
        if kind == 0:  # wrong operation
            bad = f" {a} - {b} = {a - b}. Then {a - b} - {c} = {a - b - c}. The answer is {a - b - c}."
        elif kind == 1:  # arithmetic slip
            slip = a + b + rng.choice([-3, -2, 2, 3])
            bad = f" {a} + {b} = {slip}. Then {slip} - {c} = {slip - c}. The answer is {slip - c}."
        else:  # skipped step
            bad = f" {a} + {b} = {a + b}. The answer is {a + b}."
        pairs.append((q + good, q + bad))
    return pairs


def truthful(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        wrong = rng.choice([c for c in capitals if c != capital])
        pairs.append((f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong}."))
    for a, b in rng.sample([(a, b) for a in range(2, 13) for b in range(2, 13)], 40):
        wrong = a * b + rng.choice([-2, -1, 1, 2, a, -b])
        pairs.append((f"{a} times {b} equals {a * b}.", f"{a} times {b} equals {wrong}."))
    rng.shuffle(pairs)
    return pairs


COOKING = {
    "How long should I {v} {f}?": None,
    "What temperature should I {v} {f} at?": None,
    "Can I {v} {f} the day before serving it?": None,
    "What is the best way to {v} {f} without drying it out?": None,
    "Give me a simple recipe that uses {f}.": None,
    "What can I use instead of {i} when I cook {f}?": None,
    "Why did my {f} turn out soggy when I tried to {v} it?": None,
    "Which spices go well with {f}?": None,
}
COOK_VERBS = ["roast", "bake", "grill", "fry", "steam", "poach", "braise", "boil"]
FOODS = ["chicken thighs", "salmon", "potatoes", "carrots", "a loaf of bread", "rice", "eggs", "tofu", "pork belly",
         "broccoli", "a lemon tart", "mushrooms", "lentils", "a beef stew", "aubergine", "shrimp"]  # fmt: skip
INGREDIENTS = ["butter", "fresh garlic", "white wine", "cream", "soy sauce", "lemon juice", "thyme"]
OTHER = {  # questions on other topics, each template with fills that make sense in it
    "How do I fix a flat tyre on my {x}?": ["bicycle", "car", "scooter", "wheelbarrow", "motorbike"],
    "What is the best way to learn {x}?": ["Spanish", "the guitar", "statistics", "chess", "to swim", "Python",
                                           "to paint", "Mandarin"],
    "Can you explain how {x} works in simple terms?": ["photosynthesis", "electricity", "inflation", "a vaccine",
                                                      "the stock market", "a search engine"],
    "What should I pack for a week-long trip to {x}?": ["Japan", "Norway", "the mountains", "Morocco", "Iceland"],
    "How can I save money on {x}?": ["car insurance", "my phone bill", "train tickets", "electricity", "rent",
                                     "heating", "holidays"],
    "Write a short poem about {x}.": ["the ocean", "the night sky", "an old friend", "autumn leaves", "a city at dawn"],
    "What are the main causes of {x}?": ["climate change", "inflation", "insomnia", "traffic jams", "erosion"],
    "How do I stay focused when {x}?": ["working from home", "studying for exams", "reading long reports"],
    "What is the history of {x}?": ["the Roman Empire", "the printing press", "jazz", "the bicycle", "the internet"],
    "How do I improve my {x}?": ["handwriting", "running pace", "public speaking", "sleep", "posture", "memory"],
    "Recommend a good book about {x}.": ["space", "economics", "psychology", "the sea", "ancient Greece", "maths"],
    "How does a {x} work?": ["refrigerator", "jet engine", "solar panel", "heat pump", "camera lens", "compass"],
    "What are the rules of {x}?": ["cricket", "volleyball", "poker", "rugby", "go", "tennis", "basketball"],
    "How do I set up {x}?": ["a home Wi-Fi network", "a new laptop", "a fish tank", "a budget spreadsheet", "a tent"],
    "What should I know before adopting a {x}?": ["cat", "dog", "rabbit", "parrot", "hamster"],
    "Translate 'good morning' into {x}.": ["French", "German", "Italian", "Japanese", "Swahili", "Portuguese"],
}  # fmt: skip


# Formality: one message in two registers (formal, casual), in frames that carry the register too.
MESSAGES = [
    ("the meeting has been moved to Thursday afternoon", "the meeting got moved to thursday arvo"),
    ("your order will be delivered tomorrow morning", "ur order's showing up tomorrow morning"),
    ("I am unable to attend the dinner this evening", "i can't make it to dinner tonight"),
    ("the report requires several further revisions", "the report needs a bunch more fixes"),
    ("we have received your application", "we got your application"),
    ("the library will remain closed until Monday", "the library's shut till monday"),
    ("I would be grateful for your assistance with the budget", "could really use a hand with the budget"),
    ("the results of the survey are now available", "survey results are out now"),
    ("please accept my apologies for the delay", "sorry it took me so long"),
    ("the train to the airport has been cancelled", "the airport train got cancelled"),
    ("I shall forward the documents this afternoon", "i'll send the docs over this afternoon"),
    ("the project deadline has been extended by one week", "we got an extra week for the project"),
    ("the new policy comes into effect next month", "the new rules kick in next month"),
    ("your subscription has been renewed successfully", "your subscription's all renewed"),
]
FORMAL_FRAMES = ["Dear colleague, I am writing to inform you that {m}. Kind regards.",
                 "Please be advised that {m}. Should you require further information, do not hesitate to contact us.",
                 "Good afternoon. I wish to confirm that {m}. Thank you for your understanding.",
                 "For your information, {m}. I remain at your disposal for any questions.",
                 "It is my pleasure to let you know that {m}. With best regards."]  # fmt: skip
CASUAL_FRAMES = ["hey! just so u know, {m} lol", "yo, heads up: {m}. cool?", "omg guess what, {m}!! haha",
                 "btw {m}, lmk if that's a problem", "so yeah, {m}. no biggie :)"]  # fmt: skip


def formality(rng: random.Random) -> list[tuple[str, str]]:
    """The same message written formally (positive) and casually (negative)."""
    pairs = []
    for formal, casual in MESSAGES:
        for f_frame, c_frame in zip(rng.sample(FORMAL_FRAMES, 5), rng.sample(CASUAL_FRAMES, 5), strict=True):
            pairs.append((f_frame.format(m=formal), c_frame.format(m=casual)))
    return pairs


def cooking(rng: random.Random, n: int = 90) -> list[tuple[str, int]]:
    """Cooking questions (label 1) and questions on other topics (label 0), interleaved."""
    cook, other, seen = [], [], set()
    while len(cook) < n:
        text = rng.choice(list(COOKING)).format(
            v=rng.choice(COOK_VERBS), f=rng.choice(FOODS), i=rng.choice(INGREDIENTS)
        )
        if text not in seen:
            seen.add(text)
            cook.append(text)
    if sum(len(fills) for fills in OTHER.values()) < n:
        raise ValueError(f"fewer than {n} distinct questions on other topics")
    while len(other) < n:
        template = rng.choice(list(OTHER))
        text = template.format(x=rng.choice(OTHER[template]))
        if text not in seen:
            seen.add(text)
            other.append(text)
    return [row for pair in zip(((t, 1) for t in cook), ((t, 0) for t in other), strict=True) for row in pair]


def main() -> None:
    for name, build in [
        ("sentiment", sentiment),
        ("concise", concise),
        ("reasoning", reasoning),
        ("truthful", truthful),
        ("formality", formality),
    ]:
        pairs = build(random.Random(f"steerkit-{name}"))
        lines = [
            json.dumps({"positive": p, "negative": n, "split": "test" if i % 5 == 4 else "train"})
            for i, (p, n) in enumerate(pairs)
        ]
        write_text("\n".join(lines) + "\n", OUT / f"{name}.jsonl", force=True)  # regenerates the bundled sets
        print(f"{name}: {len(pairs)} pairs")
    rows = cooking(random.Random("steerkit-condition-cooking"))
    splits = ["train", "train", "train", "val", "test"]
    lines = [json.dumps({"text": t, "label": y, "split": splits[(i // 2) % 5]}) for i, (t, y) in enumerate(rows)]
    write_text("\n".join(lines) + "\n", OUT / "conditions" / "cooking.jsonl", force=True)
    print(f"condition cooking: {len(rows)} prompts")


if __name__ == "__main__":
    main()
