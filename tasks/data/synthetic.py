"""The embedded synthetic curriculum: what `ingest` writes for a stage that has no `sources`.

Sized by `stages.<stage>.data.n_records` and fixed by `seed`. The curriculum is built for a tiny
model (BPE vocab 1024, ~100 LoRA steps on CPU) to learn visibly: a small closed world, very regular
templates, records of roughly 30-220 tokens.
  embedding     raw text about the world: one-digit arithmetic facts, sequences said twice (so the
                base learns to copy from its context), words said and then quoted in JSON (so it
                learns ` Monday` and `"Monday` are one word), JSON and key: value lines
  syntax        "Extract JSON: <request>" -> {"intent": ..., "slots": {...}}
  thinking      one-digit +/- word problems -> <think> steps </think> and "The answer is N."
  instructions  short exact tasks (repeat, reverse, count, look up a fact), 30% two-turn
"""

from __future__ import annotations

import functools
import json
import logging
import random
import string
from collections.abc import Callable
from typing import Literal

from tasks.core.config import ConfigError
from tasks.core.records import content_hash

log = logging.getLogger(__name__)

# Tries per wanted record before giving up on finding new unique ones.
MAX_TRIES_PER_RECORD = 50
MULTI_TURN_SHARE = 0.3

# --- the world ------------------------------------------------------------------------------
# Fixed, not seeded: every stage and every seed talks about the same facts, so what the
# embedding corpus says about Mara's kite is what the instructions stage asks about.

PEOPLE = {
    "Mara": "she", "Tom": "he", "Lia": "she", "Ben": "he", "Nora": "she", "Sam": "he",
    "Ada": "she", "Finn": "he", "Ivy": "she", "Leo": "he", "Rosa": "she", "Omar": "he",
}
NAMES = tuple(PEOPLE)
TOWNS = ("Oakridge", "Riverton", "Hillcrest", "Brookfield", "Pinevale", "Stonebay")
PETS = ("cat", "dog", "fox", "owl", "horse", "goat", "duck", "rabbit")
THINGS = ("kite", "hat", "bike", "bag", "cup", "ball")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
ITEMS = ("apples", "pears", "eggs", "books", "pens", "stones", "coins", "shells", "cards")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = PETS + THINGS + COLOURS


def _build_world() -> dict[str, dict]:
    rng = random.Random("stagewise-world")
    return {
        name: {
            "town": rng.choice(TOWNS),
            "pet": rng.choice(PETS),
            "colours": {thing: rng.choice(COLOURS) for thing in THINGS},
        }
        for name in NAMES
    }


WORLD = _build_world()

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    """0..99 in English words: 42 -> 'forty-two'."""
    if not 0 <= n < 100:
        raise ValueError(f"number_word covers 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pronoun(name: str) -> str:
    return PEOPLE[name].capitalize()


def _two_people(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


# --- syntax: requests -> JSON ---------------------------------------------------------------

SYNTAX_PREFIX = "Extract JSON: "
# Per intent, the slot order of the JSON answer and the request templates; a template's
# placeholders are the slots that record carries.
INTENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "book_table": (("party_size", "restaurant", "day"), (
        "Book a table for {party_size} at {restaurant} on {day}.",
        "Book a table for {party_size} at {restaurant}.",
        "Book a table at {restaurant} on {day}.",
        "Reserve a table for {party_size} on {day}.",
        "Book a table at {restaurant}.",
    )),
    "set_alarm": (("time", "day"), (
        "Set an alarm for {time}.",
        "Set an alarm for {time} on {day}.",
        "Wake me up at {time} on {day}.",
    )),
    "get_weather": (("city", "day"), (
        "What is the weather in {city}?",
        "How is the weather in {city} on {day}?",
        "What is the weather in {city} on {day}?",
        "Will it rain in {city} on {day}?",
    )),
    "send_message": (("recipient", "text"), (
        "Send a message to {recipient} saying {text}.",
        "Tell {recipient} that {text}.",
        "Text {recipient}: {text}.",
    )),
    "play_music": (("genre", "room"), (
        "Play some {genre}.",
        "Play {genre} in the {room}.",
        "Play {genre} music in the {room}.",
        "Put on some {genre} music in the {room}.",
    )),
    "add_to_list": (("quantity", "item"), (
        "Add {quantity} {item} to the shopping list.",
        "Add {item} to the shopping list.",
        "Put {quantity} {item} on my list.",
    )),
}
SLOT_VALUES: dict[str, tuple] = {
    "party_size": tuple(range(1, 11)),
    "restaurant": ("Rosa's", "Blue Door", "Luigi's", "The Oak", "Sushi Go", "Casa Mia", "Green Fork", "Pho Bay"),
    "day": DAYS,
    "time": ("6 am", "6:30 am", "7 am", "7:30 am", "8 am", "8:30 am", "9 am", "noon", "5 pm", "6 pm", "9 pm", "10 pm"),
    "city": TOWNS,
    "recipient": NAMES,
    "text": ("I am running late", "see you soon", "call me back", "dinner is ready", "happy birthday",
             "the bus is here", "I found the keys", "thank you"),
    "genre": ("jazz", "rock", "pop", "folk", "classical", "blues", "reggae", "soul"),
    "room": ("kitchen", "bedroom", "garden", "living room", "bathroom", "office"),
    "quantity": tuple(range(2, 13)),
    "item": ITEMS,
}


def syntax_example(rng: random.Random) -> tuple[str, str]:
    """One request sentence and its JSON, keys in a fixed order so the target is unambiguous."""
    intent = rng.choice(sorted(INTENTS))
    order, templates = INTENTS[intent]
    template = rng.choice(templates)
    present = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    values = {slot: rng.choice(SLOT_VALUES[slot]) for slot in order if slot in present}
    answer = json.dumps({"intent": intent, "slots": values}, ensure_ascii=False)
    return template.format(**values), answer


def syntax_record(rng: random.Random) -> dict:
    request, answer = syntax_example(rng)
    return {"messages": [
        {"role": "user", "content": SYNTAX_PREFIX + request},
        {"role": "assistant", "content": answer},
    ]}


# --- thinking: word problems with worked steps ----------------------------------------------
# A tiny model cannot learn new arithmetic in ~100 LoRA steps, but it can learn to *use* facts it
# already knows. So every step of a problem is a one-digit sum or its inverse: a fact from
# `arithmetic_facts`, which the embedding corpus (and so the base) states many times. What the stage
# teaches is the reasoning: read the counts off the question, pick the operation, chain the steps.

MAX_OPERAND = 9
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more from {other}")
LOSSES = ("gives {n} to {other}", "loses {n}")


@functools.cache
def arithmetic_facts() -> tuple[tuple[int, str, int, int], ...]:
    """Every `a + b = c` with one-digit a and b, and its inverses `c - b = a`: the facts the
    thinking stage's steps are made of (200 in all). Built once: each embedding part draws from it."""
    sums = tuple((a, "+", b, a + b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1))
    return sums + tuple((c, "-", b, a) for a, _, b, c in sums)


def _step(rng: random.Random, name: str, have: int) -> tuple[str, int]:
    """One change to a count that stays within `arithmetic_facts`: (verb phrase, new count)."""
    other = rng.choice([n for n in NAMES if n != name])
    if have > MAX_OPERAND or (have > 1 and rng.random() < 0.5):  # above 9 only a loss is a fact
        n = rng.randint(max(1, have - MAX_OPERAND), min(have, MAX_OPERAND))
        return rng.choice(LOSSES).format(n=n, other=other), have - n
    n = rng.randint(1, MAX_OPERAND)
    return rng.choice(GAINS).format(n=n, other=other), have + n


def _equation(before: int, after: int) -> str:
    sign = "+" if after >= before else "-"
    return f"{before} {sign} {abs(after - before)} = {after}"


def thinking_record(rng: random.Random) -> dict:
    """A word problem and its worked solution: each step restates a sentence of the question word
    for word (so its counts are copied, which the base's induction heads do) and applies one fact
    to it (`He buys 5 more: 7 + 5 = 12.`); the answer line repeats the last result."""
    name, other = _two_people(rng)
    items = rng.choice(ITEMS)
    shape = rng.choices(("one_step", "two_steps", "together", "difference"), weights=(4, 2, 3, 2))[0]
    if shape in ("together", "difference"):
        a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        if shape == "difference":
            a, b = max(a, b), min(a, b)
        question = (f"{name} has {a} {items}. {other} has {b} {items}. "
                    + (f"How many {items} do they have together?" if shape == "together"
                       else f"How many more {items} does {name} have than {other}?"))
        answer = a + b if shape == "together" else a - b
        steps = [f"{name} has {a} {items}.", f"{other} has {b} {items}.",
                 f"Together: {a} + {b} = {answer}." if shape == "together" else f"Difference: {a} - {b} = {answer}."]
    else:
        pro = _pronoun(name)
        have = rng.randint(1, MAX_OPERAND)
        sentences = [f"{name} has {have} {items}."]
        steps = list(sentences)
        for i in range(1 if shape == "one_step" else 2):
            phrase, after = _step(rng, name, have)
            change = f"{'Then ' + pro.lower() if i else pro} {phrase}"
            sentences.append(change + ".")
            steps.append(f"{change}: {_equation(have, after)}.")
            have = after
        question = " ".join(sentences) + f" How many {items} does {name} have now?"
        answer = have
    reply = "<think>\n" + "\n".join(steps) + f"\n</think>\nThe answer is {answer}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


# --- instructions: short exact tasks, some with a follow-up ---------------------------------

Turn = tuple[str, str]  # (user, assistant)


def _upper(prev: str) -> Turn:
    return "Now in uppercase.", prev.upper()


def _task_repeat(rng: random.Random) -> tuple[Turn, Turn]:
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    first = (f"Repeat the word {word} {number_word(times)} times.", " ".join([word] * times))
    more = (f"Now {number_word(times + 1)} times.", " ".join([word] * (times + 1)))
    return first, rng.choice([more, _upper(first[1])])


def _task_colour(rng: random.Random) -> tuple[Turn, Turn]:
    name = rng.choice(NAMES)
    asked, other = rng.sample(THINGS, 2)
    colours = WORLD[name]["colours"]
    facts = [_a(f"{colours[t]} {t}") for t in rng.sample([asked, other], 2)]
    first = (f"{name} has {facts[0]} and {facts[1]}. What colour is the {asked} of {name}?",
             f"The {asked} of {name} is {colours[asked]}.")
    return first, (f"And the {other}?", f"The {other} of {name} is {colours[other]}.")


def _task_town(rng: random.Random) -> tuple[Turn, Turn]:
    one, two = _two_people(rng)
    asked, other = rng.sample([one, two], 2)
    first = (f"{one} lives in {WORLD[one]['town']}. {two} lives in {WORLD[two]['town']}. Where does {asked} live?",
             f"{asked} lives in {WORLD[asked]['town']}.")
    return first, (f"And {other}?", f"{other} lives in {WORLD[other]['town']}.")


def _task_reverse(rng: random.Random) -> tuple[Turn, Turn]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    first = ("Reverse these words: " + " ".join(words), " ".join(reversed(words)))
    return first, _upper(first[1])


def _world_sentence(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    return rng.choice((
        f"{name} lives in {WORLD[name]['town']}.",
        f"{name} has {_a(WORLD[name]['pet'])}.",
        f"{name} has a {WORLD[name]['colours'][thing]} {thing}.",
        f"The {thing} of {name} is {WORLD[name]['colours'][thing]}.",
        f"{name} has {rng.randint(2, 12)} {rng.choice(ITEMS)}.",
        f"{name} and {rng.choice([n for n in NAMES if n != name])} live in {rng.choice(TOWNS)}.",
    ))


def _task_count(rng: random.Random) -> tuple[Turn, Turn]:
    def turn(prefix: str) -> Turn:
        sentence = _world_sentence(rng)
        return f"{prefix}: {sentence}", f"There are {len(sentence.split())} words."

    return turn("Count the words in"), turn("Now count the words in")


GREETINGS = ("hello", "good morning", "good night", "goodbye")


def _task_greet(rng: random.Random) -> tuple[Turn, Turn]:
    name, other = _two_people(rng)
    greeting, then = rng.sample(GREETINGS, 2)
    first = (f"Say {greeting} to {name}.", f"{greeting.capitalize()}, {name}!")
    return first, rng.choice([(f"And to {other}?", f"{greeting.capitalize()}, {other}!"),
                              (f"Now say {then}.", f"{then.capitalize()}, {name}!"), _upper(first[1])])


# Weights favour the tasks with many distinct records, so deduplication does not skew the mix.
INSTRUCTION_TASKS: dict[Callable[[random.Random], tuple[Turn, Turn]], int] = {
    _task_repeat: 2, _task_colour: 3, _task_town: 2, _task_reverse: 3, _task_count: 3, _task_greet: 1,
}


def instructions_record(rng: random.Random) -> dict:
    task_fn = rng.choices(list(INSTRUCTION_TASKS), weights=list(INSTRUCTION_TASKS.values()))[0]
    first, follow_up = task_fn(rng)
    turns = [first, follow_up] if rng.random() < MULTI_TURN_SHARE else [first]
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


# --- embedding: raw text about the world ----------------------------------------------------


def _arithmetic_sentence(rng: random.Random) -> str:
    """One fact of `arithmetic_facts`, in words and in digits."""
    a, op, b, c = rng.choice(arithmetic_facts())
    verb = "plus" if op == "+" else "minus"
    return f"{number_word(a).capitalize()} {verb} {number_word(b)} is {number_word(c)}. {a} {op} {b} = {c}."


def _arithmetic_drill(rng: random.Random) -> str:
    """Three to five facts in the form the thinking stage's steps use: `7 + 5 = 12.`"""
    return " ".join("{} {} {} = {}.".format(*fact) for fact in rng.sample(arithmetic_facts(), rng.randint(3, 5)))


def copy_drill(rng: random.Random, name: str) -> str:
    """A random sequence said twice: its second half can only be predicted by copying the first,
    which is the skill (an induction head) every later stage needs to read values off a prompt."""
    pool = WORDS + NAMES + tuple(str(n) for n in range(MAX_OPERAND + 1))
    seq = " ".join(rng.sample(pool, rng.randint(3, 6)))
    return f"{name} reads out: {seq}. {_pronoun(name)} says it again: {seq}."


@functools.cache
def _quotable_words() -> tuple[str, ...]:
    """One-token words the later stages write inside JSON strings: slot values, names, things."""
    values = {str(v) for slot_values in SLOT_VALUES.values() for v in slot_values}
    return tuple(sorted(w for w in values | set(WORDS) | set(NAMES) if " " not in w))


def quote_drill(rng: random.Random, name: str) -> str:
    """Words said in prose, then written as JSON strings. After a quote a word is another token
    than after a space (`"Monday` is not ` Monday`), so a slot value copied from a request into
    JSON must cross from one to the other; this is the text the base learns that from."""
    words = rng.sample(_quotable_words(), rng.randint(2, 4))
    return f"{name} writes down {' '.join(words)}. As JSON: {json.dumps(words)}"


# How many times each drill (copy, quote) is among an embedding part's choices.
DRILL_WEIGHT = 4

# How many times each retold-count sentence is among an embedding part's choices: about half the
# parts. The tiny base copies a count it has just read only when such text is this dense.
RETOLD_WEIGHT = 5


def _retold_counts(rng: random.Random, name: str, other: str, items: str) -> tuple[Callable[[], str], ...]:
    """Counts stated, then said again (with the one-digit fact that changes them): text in which
    a number can only be predicted by copying it from earlier, as a thinking step must."""
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    other_items = rng.choice([i for i in ITEMS if i != items])
    third = rng.choice([n for n in NAMES if n not in (name, other)])
    return (
        lambda: f"{third} has {a} {items} and {other} has {b} {other_items}. So {third} has {a} {items} and {other} has {b} {other_items}.",
        lambda: f"{third} has {a} {items}. {_pronoun(third)} buys {b} more. {third} had {a} and bought {b}: {a} + {b} = {a + b}. Now {third} has {a + b} {items}.",
        lambda: f"{other} has {a + b} {items}. {_pronoun(other)} gives {b} to {third}. {other} had {a + b} and gave {b}: {a + b} - {b} = {a}. Now {other} has {a} {items}.",
        lambda: f"{third} has {a} {items}. {other} has {b} {items}. Together {third} and {other} have {a} + {b} = {a + b} {items}.",
    )


def _embedding_part(rng: random.Random, name: str, items: str) -> str:
    """One sentence (or a block on its own lines) about `name` or the world around them.

    `items` is fresh for each call, so counts in one document never contradict each other.
    """
    facts = WORLD[name]
    other = rng.choice([n for n in NAMES if n != name])
    thing = rng.choice(THINGS)
    have, more = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    word = rng.choice(WORDS)
    pro = _pronoun(name)
    makers: tuple[Callable[[], str], ...] = (
        lambda: f"{name} lives in {facts['town']}.",
        lambda: f"{name} has {_a(facts['pet'])}. The {facts['pet']} lives with {name} in {facts['town']}.",
        lambda: f"{name} has a {facts['colours'][thing]} {thing}.",
        lambda: f"The {thing} of {name} is {facts['colours'][thing]}.",
        lambda: f"{name} has {have} {rng.choice(COLOURS)} {items}.",
        lambda: f"{name} has {number_word(have)} {items}. {pro} buys {more} more. Now {name} has {have + more} {items}.",
        lambda: f"{name} has {have} {items}. {pro} gives {min(more, have)} to {other}. Now {name} has {have - min(more, have)} {items}.",
        lambda: f"{name} has {have} {items}. How many {items} does {name} have? The answer is {have}.",
        lambda: _arithmetic_sentence(rng),
        lambda: _arithmetic_drill(rng),
        lambda: _arithmetic_drill(rng),
        lambda: f"{name} says hello to {other}: Hello, {other}!",
        lambda: f"{name} writes the word {word} three times: {word} {word} {word}. In uppercase it is {word.upper()}.",
        lambda: f"\nname: {name}\ntown: {facts['town']}\npet: {facts['pet']}\n",
        lambda: "\n" + json.dumps({"name": name, "town": facts["town"], "pet": facts["pet"]}) + "\n",
        lambda: "{} asks: {} As JSON: {}".format(name, *syntax_example(rng)),
        lambda: "{} asks: {} As JSON: {}".format(name, *syntax_example(rng)),
    )
    makers += (lambda: copy_drill(rng, name),) * DRILL_WEIGHT + (lambda: quote_drill(rng, name),) * DRILL_WEIGHT
    makers += _retold_counts(rng, name, other, items) * RETOLD_WEIGHT
    return rng.choice(makers)()


def embedding_record(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    n_parts = rng.randint(3, 6)
    text = ""
    for items in rng.sample(ITEMS, n_parts):
        part = _embedding_part(rng, name, items)
        text += part if not text or text.endswith("\n") or part.startswith("\n") else " " + part
    return {"text": text.strip().replace("\n\n", "\n")}


# --- the stage ------------------------------------------------------------------------------

GENERATORS: dict[str, tuple[str, Callable[[random.Random], dict]]] = {
    "embedding": ("pretrain", embedding_record),
    "syntax": ("sft", syntax_record),
    "thinking": ("sft", thinking_record),
    "instructions": ("sft", instructions_record),
}


def generate_stage_records(stage: str, kind: Literal["pretrain", "sft"], n_records: int, seed: int) -> list[dict]:
    """`n_records` unique synthetic records for a built-in stage, the same for the same seed."""
    if stage not in GENERATORS:
        raise ConfigError(
            f"no synthetic data for stage {stage!r} (built in: {', '.join(GENERATORS)}): "
            f"list your files under stages.{stage}.data.sources"
        )
    expected, make = GENERATORS[stage]
    if kind != expected:
        raise ConfigError(f"stages.{stage}.kind is {kind!r}, but the built-in {stage} data is {expected!r}")
    rng = random.Random(f"{seed}:{stage}")  # own stream per stage: resizing one stage leaves the others alone
    records, seen = [], set()
    for _ in range(n_records * MAX_TRIES_PER_RECORD):
        if len(records) == n_records:
            break
        record = make(rng)
        digest = content_hash(record)
        if digest not in seen:  # the validator rejects duplicates, so never emit them
            seen.add(digest)
            records.append(record)
    if len(records) < n_records:
        log.warning("%s: only %d unique records of the %d asked for", stage, len(records), n_records)
    return records
