"""Question templates as one table: the wordings synthesis draws from and the gold turns the trainer imitates.

Adding a question kind is one `Template` entry: its wordings (slots in braces), the held-out wordings used only
for out-of-domain dev sets, and its plan, one step per policy turn. A step's think text may branch on a slot
(`branch`), so a Compare plan can say "yes" or "no" from what it read. Slots: {this} "this moon", {these}
"these two moons", {type}/{types}, {rel}, {rel2}, {verb}, {value}; in plans also {A}, {B} (the entities shown),
{M} (a bridge entity), {va}, {vb} (values read), {ans}."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from .. import grammar


@dataclass(frozen=True)
class Step:
    """One gold policy turn: an action with its argument template, and think variants (or variants per branch)."""

    action: str  # image_search | text_search | answer
    arg: str
    think: tuple | dict


@dataclass(frozen=True)
class Template:
    """A question pattern: what it asks, in how many words, and how a good policy answers it."""

    name: str
    split: str  # Bridge | Compare
    hops: int
    wordings: tuple[str, ...]
    heldout: tuple[str, ...]  # never used for training: out-of-domain dev sets ask with these
    plan: tuple[Step, ...] = field(default=())


_ID1 = Step("image_search", "1", ("First identify what image 1 shows.", "Find out what the picture shows.",
                                  "I need to know what is in image 1.", "Identify the image first."))
_ID2 = Step("image_search", "2", ("Image 1 is {A}. Now identify image 2.", "The first image shows {A}. What is "
                                  "the second?", "Image 1: {A}. Next, image 2."))
_ID1C = Step("image_search", "1", ("Identify image 1 first.", "Two images: find what the first one shows.",
                                   "Start with image 1."))

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("fact", "Bridge", 2, wordings=(
        "What is the {rel} of {this}?", "Name the {rel} of {this}.", "Can you tell me the {rel} of {this}?",
        "I'd like to know the {rel} of {this}.", "Tell me the {rel} of {this}.", "Give the {rel} of {this}.",
        "Identify {this} and give its {rel}.", "Look at the picture: what is the {rel} of {this}?",
        "Find the {rel} of {this}.", "What {rel} does {this} have?", "Which is the {rel} of {this}?",
        "Please state the {rel} of {this}."),
        heldout=("Do you know the {rel} of {this}?", "Work out the {rel} of {this}.",
                 "Report the {rel} of {this}.", "Looking at {this}, what would its {rel} be?"),
        plan=(_ID1,
              Step("text_search", "{A} {rel}", ("It is {A}. Now find its {rel}.", "This is {A}. Search for the {rel} "
                                                "of {A}.", "The image shows {A}. Look up its {rel}.")),
              Step("answer", "{ans}", ("The passage on {A} gives the {rel}: {ans}.", "{A}'s {rel} is {ans}.",
                                       "Found it: the {rel} of {A} is {ans}.")))),
    Template("number", "Bridge", 2, wordings=(
        "What is the {rel} of {this}?", "Roughly what is the {rel} of {this}?", "Give the {rel} of {this}.",
        "About how much is the {rel} of {this}?", "Tell me the approximate {rel} of {this}.",
        "What figure is given for the {rel} of {this}?", "State the {rel} of {this} as a number.",
        "Approximately what is the {rel} of {this}?", "Can you give the {rel} of {this}?",
        "How large is the {rel} of {this}?", "Find the {rel} of {this}.", "What number describes the {rel} of {this}?"),
        heldout=("Estimate the {rel} of {this}.", "Which number is the {rel} of {this}?",
                 "Look up the {rel} of {this}.", "Report the {rel} of {this}, roughly."),
        plan=(_ID1,
              Step("text_search", "{A} {rel}", ("It is {A}. Find its {rel}.", "This is {A}. Search for the {rel} of "
                                                "{A}.", "The image shows {A}. Look up its {rel}.")),
              Step("answer", "{ans}", ("The passage gives the {rel} of {A}: {ans}.", "{A}: {rel} {ans}.",
                                       "The {rel} of {A} is about {ans}.")))),
    Template("year", "Bridge", 2, wordings=(
        "In which year was {this} {verb}?", "When was {this} {verb}?", "In what year was {this} {verb}?",
        "What year was {this} {verb} in?", "Tell me the year {this} was {verb}.", "Which year saw {this} {verb}?",
        "Give the year in which {this} was {verb}.", "{This} was {verb} in which year?",
        "Find the year {this} was {verb}.", "Name the year when {this} was {verb}.",
        "What is the year {this} was {verb}?", "Can you say when {this} was {verb}?"),
        heldout=("Do you know when {this} was {verb}?", "Year in which {this} was {verb}?",
                 "Look up when {this} was {verb}.", "How long ago, in which year, was {this} {verb}?"),
        plan=(_ID1,
              Step("text_search", "{A} {verb}", ("It is {A}. Find when it was {verb}.", "This is {A}. Search for "
                                                 "when {A} was {verb}.", "The image shows {A}. Look up the year.")),
              Step("answer", "{ans}", ("{A} was {verb} in {ans}.", "The passage says {A} was {verb} in {ans}.",
                                       "Found the year: {ans}.")))),
    Template("bridge", "Bridge", 3, wordings=(
        "What is the {rel2} of the {rel} of {this}?", "Find the {rel} of {this}; what is its {rel2}?",
        "Name the {rel2} of the {rel} of {this}.", "{This} has a {rel}. What is the {rel2} of that {rel}?",
        "Tell me the {rel2} of the {rel} of {this}.", "Which is the {rel2} of the {rel} of {this}?",
        "Give the {rel2} of the {rel} of {this}.", "What {rel2} belongs to the {rel} of {this}?",
        "Identify {this}, find its {rel}, then give that one's {rel2}.", "I want the {rel2} of the {rel} of {this}.",
        "Consider the {rel} of {this}. What is its {rel2}?", "The {rel} of {this}: what is its {rel2}?"),
        heldout=("Look at {this}: its {rel} has which {rel2}?", "Do you know the {rel2} of the {rel} of {this}?",
                 "Trace {this} to its {rel} and report that {rel}'s {rel2}.",
                 "What would the {rel2} of the {rel} of {this} be?"),
        plan=(_ID1,
              Step("text_search", "{A} {rel}", ("It is {A}. Find its {rel}.", "This is {A}. Which is its {rel}?",
                                                "The image shows {A}. Look up the {rel} of {A}.")),
              Step("text_search", "{M} {rel2}", ("The {rel} of {A} is {M}. Now find the {rel2} of {M}.",
                                                 "{A}'s {rel} is {M}. Search for the {rel2} of {M}.",
                                                 "So the {rel} is {M}. Next, the {rel2} of {M}.")),
              Step("answer", "{ans}", ("The {rel2} of {M} is {ans}.", "The passage on {M} gives the {rel2}: {ans}.",
                                       "{M}'s {rel2} is {ans}.")))),
    Template("more", "Compare", 4, wordings=(
        "Which of {these} has the larger {rel}?", "Which one of {these} has the greater {rel}?",
        "Of {these}, which has the higher {rel}?", "Compare {these}: which has the larger {rel}?",
        "Which has the bigger {rel}, the first or the second of {these}?", "Between {these}, whose {rel} is larger?",
        "Which of {these} ranks higher by {rel}?", "Which of {these} has more {rel}?",
        "Tell me which of {these} has the larger {rel}.", "Name the one of {these} with the greater {rel}.",
        "Looking at {these}, which one's {rel} is larger?", "Which is larger by {rel}: the first or the second?"),
        heldout=("Do you know which of {these} has the larger {rel}?", "Which of {these} wins on {rel}?",
                 "Pick the one of {these} whose {rel} is greater.", "Which of {these} scores higher on {rel}?"),
        plan=(_ID1C, _ID2,
              Step("text_search", "{A} {rel}", ("Image 2 is {B}. Find the {rel} of {A}.", "The second is {B}. First "
                                                "the {rel} of {A}.", "Image 2: {B}. Look up {A}'s {rel}.")),
              Step("text_search", "{B} {rel}", ("{A}: {va}. Now the {rel} of {B}.", "The {rel} of {A} is {va}. "
                                                "Next, {B}.", "{A} has {va}. Search for the {rel} of {B}.")),
              Step("answer", "{ans}", ("{B}: {vb}. {A}: {va}, {B}: {vb}, so {ans} has the larger {rel}.",
                                       "{A} {va} against {B} {vb}: {ans} is larger.",
                                       "{B} has {vb}. Comparing {va} and {vb}, the answer is {ans}.")))),
    Template("same", "Compare", 4, wordings=(
        "Do {these} have the same {rel}?", "Is the {rel} of {these} the same?", "Do {these} share the same {rel}?",
        "Are {these} in the same {rel}?", "Do {these} have one {rel} in common?",
        "Is the {rel} of the first the same as the {rel} of the second?", "Same {rel} for {these}: yes or no?",
        "Do both {types} shown have the same {rel}?", "Tell me whether {these} share a {rel}.",
        "Is it true that {these} have the same {rel}?", "Do {these} have an identical {rel}?",
        "Answer yes or no: do {these} share the same {rel}?"),
        heldout=("Are {these} alike in {rel}?", "Would you say {these} have the same {rel}?",
                 "Check whether {these} share one {rel}.", "Is there one {rel} shared by {these}?"),
        plan=(_ID1C, _ID2,
              Step("text_search", "{A} {rel}", ("Image 2 is {B}. Find the {rel} of {A}.", "The second is {B}. First "
                                                "the {rel} of {A}.", "Image 2: {B}. Look up {A}'s {rel}.")),
              Step("text_search", "{B} {rel}", ("The {rel} of {A} is {va}. Now the {rel} of {B}.",
                                                "{A}: {va}. Next, the {rel} of {B}.",
                                                "{A}'s {rel} is {va}. Search for {B}'s.")),
              Step("answer", "{ans}", {"yes": ("{B}'s {rel} is {vb} too. Same, so yes.",
                                               "Both have {va} as {rel}: yes.", "{A}: {va}, {B}: {vb}. The same, yes."),
                                       "no": ("{B}'s {rel} is {vb}, not {va}. Different, so no.",
                                              "{A}: {va}, {B}: {vb}. They differ: no.",
                                              "{B} has {vb} but {A} has {va}, so no.")}))),
    Template("pick", "Compare", 3, wordings=(
        "Which of {these} has {value} as its {rel}?", "Which one of {these} has the {rel} {value}?",
        "Of {these}, which one's {rel} is {value}?", "Which of {these} is the one whose {rel} is {value}?",
        "Tell me which of {these} has {value} as {rel}.", "Between {these}, which has {rel} {value}?",
        "Name the one of {these} whose {rel} is {value}.", "{Value} is the {rel} of which of {these}?",
        "Which of {these} goes with the {rel} {value}?", "Identify which of {these} has {value} for its {rel}.",
        "Whose {rel} is {value}: the first or the second of {these}?", "Which of {these} matches the {rel} {value}?"),
        heldout=("Which of {these} would have {value} as its {rel}?", "Point out which of {these} has the {rel} "
                 "{value}.", "For which of {these} is the {rel} {value}?", "Of {these}, find the one with {rel} "
                 "{value}."),
        plan=(_ID1C, _ID2,
              Step("text_search", "{A} {rel}", ("Image 2 is {B}. Is the {rel} of {A} {value}?", "The second is {B}. "
                                                "Check the {rel} of {A}.", "Image 2: {B}. Look up {A}'s {rel}.")),
              Step("answer", "{ans}", {"yes": ("Yes, the {rel} of {A} is {value}.", "{A}'s {rel} is {value}, so it "
                                               "is {A}.", "The passage says {A} has {value}: {A}."),
                                       "no": ("No, the {rel} of {A} is {va}, so it is {B}.", "{A}'s {rel} is {va}, "
                                              "not {value}: it is {B}.", "{A} has {va}, so the answer is {B}.")}))),
)}


def plural(word: str) -> str:
    """English plural of a type word.

    >>> [plural(w) for w in ("moon", "galaxy", "nebula", "fish", "species", "box")]
    ['moons', 'galaxies', 'nebulae', 'fish', 'species', 'boxes']
    """
    if word.endswith(("species", "fish", "sheep", "deer", "series")):
        return word
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith("ula"):
        return word + "e"
    if word.endswith(("s", "x", "ch", "sh", "z")):
        return word + "es"
    return word + "s"


THIS = ("this {type}", "the {type} shown", "the {type} in the picture", "the {type} in this image",
        "the pictured {type}", "the {type} in the photo")
THESE = ("these two {types}", "the two {types} shown", "the two {types} in the pictures", "the pictured {types}",
         "both {types} in the images")


def fill(text: str, slots: dict, escape: bool = False) -> str:
    """Fill {slots}; a capitalised slot name ({This}) capitalises its value. escape=True escapes the values (for
    text the policy writes: a KB title must never become a tag or a special token)."""
    def sub(m):
        key = m.group(1)
        val = str(slots.get(key, slots.get(key.lower(), m.group(0))))
        val = val[:1].upper() + val[1:] if key[:1].isupper() else val
        return grammar.escape(val) if escape else val

    return re.sub(r"\{(\w+)\}", sub, text)


def pick(options, key: str):
    """A deterministic choice among variants, keyed by a string (so a question always gets the same turns)."""
    return options[int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % len(options)]


def gold_turns_for(name: str, slots: dict, key: str) -> list[str] | None:
    """The policy turns of a template's plan, in our grammar, with every slot filled."""
    t = TEMPLATES.get(name)
    if t is None or not t.plan:
        return None
    turns = []
    for i, step in enumerate(t.plan):
        think = step.think[slots["branch"]] if isinstance(step.think, dict) else step.think
        thought = fill(pick(think, f"{key}/{i}"), slots, escape=True)
        turns.append(f"<think>{thought}</think><{step.action}>{fill(step.arg, slots, escape=True)}</{step.action}>")
    return turns
