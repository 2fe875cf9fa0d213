"""A knowledge base of fictional towns and the articles, answers and questions made from it.

Every fact is a template sentence, so a generated answer can be checked exactly: ``check_facts``
parses each sentence back to (town, attribute, value) and compares it with the knowledge base.

An article states a town's eight facts and three fact-free filler sentences. It has a *focus*
(history, economy, people or geography) whose two facts form its lead; the other facts and the
fillers follow in a seeded random order. Its answers put the focus facts first and then the others
in a fixed order of importance (which the model must find in the shuffled body): <|l0|> one
sentence, <|l1|> two, <|l2|> four, <|l3|> six. An answer names its town once, in its first sentence,
and then says "It"/"Its" (as a summary would; it also keeps every token trigram of a gold answer
unique, so rollouts sampled under the reference's no_repeat_ngram_size=3 can still write one).

The question asks about the focus and names the numbers the answer states *after* its first
sentence, the founding year and the population ("What keeps the economy of Varnolo, home to 152
thousand people and founded in 1921, going?"): the facts the tiny model copied worst (issue 14: 38
of the 61 wrong sentences in 64 long answers of the *previous* shipped model, on the previous corpus,
were a wrong year or population; of the retrained model's 90 wrong greedy sentences on all 1,200
held-out answers, all were: 54 years, 36 populations; counted 2026-12-02).
So the question is not a function of the first sentence (town + focus): answers of one
article at different lengths get different questions, and reconstructing the question from an
answer checks its later year and population — and no other fact: the question gives away one or two
facts of its answer, the rest are invisible to the reconstruction. The question is still a function
of the answer alone (decoder 2 of the reference wiring reads only the answer), self-contained (it
names the town), and answered by the answer at every length.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COUNTRIES = ["Ostland", "Merovia", "Callum", "Davren", "Esker", "Felmark", "Gorsa", "Hallin"]
RIVERS = ["Amber", "Blackwater", "Cold", "Dunmere", "Elm", "Fenwick", "Grey", "Hollow"]
INDUSTRIES = ["fishing", "textiles", "mining", "shipbuilding", "software", "wine", "tourism", "timber"]
LANDMARKS = ["an old stone bridge", "a glass museum", "a red lighthouse", "a clock tower", "a covered market",
             "a hillside castle", "a botanical garden", "a wooden opera house"]
MONTHS = ["January", "March", "May", "June", "August", "September", "October", "December"]
FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karin", "Luka"]
LAST = ["Adler", "Brandt", "Costa", "Dahl", "Eberly", "Foss", "Grimm", "Holm", "Ivers", "Jansen", "Kovac", "Lind"]
SYLLABLES = ["var", "no", "lo", "ket", "mira", "dun", "sel", "ta", "bro", "vik", "an", "ze", "ril", "po", "ga", "tem"]

#: attribute -> sentence template naming the town ({town} and {value})
TEMPLATES = {
    "founded": "{town} was founded in {value}.",
    "country": "{town} lies in {value}.",
    "river": "{town} stands on the {value} river.",
    "population": "{town} has {value} thousand inhabitants.",
    "industry": "The main industry of {town} is {value}.",
    "mayor": "The mayor of {town} is {value}.",
    "landmark": "{town} is known for {value}.",
    "festival": "{town} holds its festival in {value}.",
}
#: attribute -> the same sentence about the town last named ({value})
PRONOUN_TEMPLATES = {
    "founded": "It was founded in {value}.",
    "country": "It lies in {value}.",
    "river": "It stands on the {value} river.",
    "population": "It has {value} thousand inhabitants.",
    "industry": "Its main industry is {value}.",
    "mayor": "Its mayor is {value}.",
    "landmark": "It is known for {value}.",
    "festival": "It holds its festival in {value}.",
}
#: the facts a question names when its answer states them after the first sentence (in answer order)
QUESTION_FACTS = {"founded": "founded in {value}", "population": "home to {value} thousand people"}
FOCUS = {  # focus -> (its two facts, question template; {named}: ", founded in 1921," or "")
    "history": (["founded", "landmark"], "How did {town}{named} come to be what it is today?"),
    "economy": (["industry", "population"], "What keeps the economy of {town}{named} going?"),
    "people": (["mayor", "festival"], "Who leads {town}{named} and when do its people celebrate?"),
    "geography": (["country", "river"], "Where is {town}{named} found?"),
}
ORDER = ["founded", "industry", "mayor", "country", "population", "river", "landmark", "festival"]
BUCKET_SENTENCES = [1, 2, 4, 6]
BUCKETS = [f"<|l{i}|>" for i in range(len(BUCKET_SENTENCES))]
FILLERS = ["Visitors often arrive by train in the morning.", "The weather is mild for most of the year.",
           "Local newspapers cover the town every week.", "Many families have lived there for generations.",
           "The streets are quiet after dark.", "Cyclists like the flat roads around it.",
           "Its schools follow the national programme.", "Prices there are close to the national average."]


@dataclass(frozen=True)
class Town:
    name: str
    facts: dict

    def sentence(self, attribute: str, pronoun: bool = False) -> str:
        if pronoun:
            return PRONOUN_TEMPLATES[attribute].format(value=self.facts[attribute])
        return TEMPLATES[attribute].format(town=self.name, value=self.facts[attribute])

    def answer(self, attributes: list[str]) -> str:
        """The town named in the first sentence, "It"/"Its" in the others."""
        return " ".join(self.sentence(a, pronoun=i > 0) for i, a in enumerate(attributes))

    def question(self, focus: str, attributes: list[str]) -> str:
        """The focus question for an answer stating ``attributes``, naming its later ``QUESTION_FACTS``."""
        named = [QUESTION_FACTS[a].format(value=self.facts[a]) for a in attributes[1:] if a in QUESTION_FACTS]
        return FOCUS[focus][1].format(town=self.name, named=f", {' and '.join(named)}," if named else "")


def make_towns(n: int, seed: int = 0) -> list[Town]:
    """``n`` towns with distinct names and seeded facts."""
    rnd = random.Random(seed)
    names: set[str] = set()
    towns = []
    while len(towns) < n:
        name = "".join(rnd.choice(SYLLABLES) for _ in range(rnd.choice([2, 3]))).capitalize()
        if name in names:
            continue
        names.add(name)
        towns.append(Town(name, {
            "founded": rnd.randint(1100, 1950), "country": rnd.choice(COUNTRIES), "river": rnd.choice(RIVERS),
            "population": rnd.randint(5, 900), "industry": rnd.choice(INDUSTRIES),
            "mayor": f"{rnd.choice(FIRST)} {rnd.choice(LAST)}", "landmark": rnd.choice(LANDMARKS),
            "festival": rnd.choice(MONTHS)}))
    return towns


def answer_attributes(focus: str, bucket: int) -> list[str]:
    """The facts an answer of this focus and length bucket states, in order."""
    first = FOCUS[focus][0]
    return (first + [a for a in ORDER if a not in first])[:BUCKET_SENTENCES[bucket]]


def article(town: Town, focus: str, rnd: random.Random) -> str:
    """The lead states the focus facts (as a news lead would); the other facts and three fillers
    follow in a random order."""
    lead = FOCUS[focus][0]
    rest = [town.sentence(a) for a in ORDER if a not in lead] + rnd.sample(FILLERS, 3)
    rnd.shuffle(rest)
    return " ".join([town.sentence(a) for a in lead] + rest)


def build_examples(towns: list[Town], seed: int = 0) -> list[dict]:
    """One article per town (a random focus) and its four (bucket, answer, question) examples: dicts
    with id, town, focus, bucket, article, answer, question."""
    rnd = random.Random(seed)
    out = []
    for t in towns:
        focus = rnd.choice(sorted(FOCUS))
        text = article(t, focus, rnd)
        for b in range(len(BUCKETS)):
            attrs = answer_attributes(focus, b)
            out.append({"id": f"{t.name}-{b}", "town": t.name, "focus": focus, "bucket": b, "article": text,
                        "answer": t.answer(attrs), "question": t.question(focus, attrs)})
    return out


def _patterns(templates: dict[str, str]) -> dict[str, re.Pattern]:
    pats = {}
    for attr, tpl in templates.items():
        rx = re.escape(tpl).replace(r"\{town\}", r"(?P<town>[A-Z][a-z]+)").replace(r"\{value\}", r"(?P<value>.+?)")
        pats[attr] = re.compile("^" + rx + "$")
    return pats


PATTERNS = _patterns(TEMPLATES)
PRONOUN_PATTERNS = _patterns(PRONOUN_TEMPLATES)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.?!]*[.?!]", text) if s.strip()]


def check_facts(answer: str, kb: dict[str, Town], town: str | None = None) -> dict:
    """Exact fact check of a generated answer: each sentence that parses as a fact template about a
    known town — named, or "It"/"Its": the town last named in the answer — is correct when the value
    equals the knowledge base's (and, with ``town``, when it is about that town). Each (town,
    attribute) counts once: a sentence restating an attribute already stated says nothing new and
    is not correct (so repeating one true fact does not score as a full answer). A pronoun sentence
    before any known town is named, or after a sentence naming a town the knowledge base does not
    hold, is not a fact. Returns {"sentences", "facts" (parsed, distinct), "correct", "accuracy"
    (correct / sentences; 0 for an empty answer)}."""
    sentences = split_sentences(answer)
    facts = correct = 0
    last = None  # the town "It" refers to (None: no town named yet, or one not in the knowledge base)
    seen: set[tuple[str, str]] = set()
    for s in sentences:
        about = None
        for attr, rx in PATTERNS.items():
            m = rx.match(s)
            if m and m["town"] not in ("It", "Its"):  # "It was founded in …" is a pronoun sentence
                about = last = m["town"] if m["town"] in kb else None
                break
        else:
            for attr, rx in PRONOUN_PATTERNS.items():
                m = rx.match(s)
                if m:
                    about = last
                    break
        if about is not None and (about, attr) not in seen:
            seen.add((about, attr))
            facts += 1
            correct += int(str(kb[about].facts[attr]) == m["value"] and (town is None or about == town))
    return {"sentences": len(sentences), "facts": facts, "correct": correct,
            "accuracy": correct / len(sentences) if sentences else 0.0}
