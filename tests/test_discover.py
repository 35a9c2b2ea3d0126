"""Answer-guided discovery: trajectories for questions with a known answer and no template, found by searching
with the loop's own actions, replayed through the real loop; and rejection sampling of the policy's rollouts."""
import json

import pytest
from fakes import HashTextEncoder, ScriptedGenerator, TinyImageEncoder

from mmhops_lite import grammar
from mmhops_lite.config import Config
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.loop import Perception, answer
from mmhops_lite.train.discover import discover_turns, discovered_episode, question_terms, rejection_sample
from mmhops_lite.types import Question

# Image entity A (a tower) names bridge entity B (a country); only B's passage holds the answer.
PASSAGES = {
    "Zorgtower": "Zorgtower is a tower in Freedonia. It is 324 metres tall.",
    "Blimptower": "Blimptower is a tower in Sylvania. It is 150 metres tall.",
    "Freedonia": "Freedonia is a nation whose capital is Fredville. It has a population of 2.5 million people.",
    "Sylvania": "Sylvania is a nation whose capital is Sylport. It has a population of 1.2 million people.",
    "Capital Country Fair": "The capital country fair stands in every capital of every country each year.",
    "Country Stands": "Country stands sell food; a capital idea for any country road stands.",
    "Population Studies": "Population studies count the larger population of every country.",
}
COLOURS = {"Zorgtower": (200, 30, 30), "Blimptower": (30, 160, 40), "Freedonia": (30, 40, 200),
           "Sylvania": (220, 200, 20)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("disc")
    kb = root / "kb"
    (kb / "images").mkdir(parents=True)
    passages = [{"id": f"p{i}", "title": t, "text": x, "source": "test"} for i, (t, x) in enumerate(PASSAGES.items())]
    passages += [{"id": f"f{j}", "title": f"Topic {j}", "text": f"Filler about astronomy, cooking and rivers {j}.",
                  "source": "test"} for j in range(12)]
    images = []
    for i, (name, col) in enumerate(COLOURS.items()):
        im = Image.new("RGB", (96, 64), col)
        ImageDraw.Draw(im).ellipse([8 + 10 * i, 8, 50 + 10 * i, 56], fill=(255 - col[0], 255 - col[1], 255 - col[2]))
        im.save(kb / "images" / f"{name.lower()}.png")
        images.append({"id": f"img:{name.lower()}", "path": f"images/{name.lower()}.png", "title": name,
                       "caption": name})
    for name, rows in (("passages", passages), ("images", images)):
        (kb / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sync(root / "idx", KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    with MultimodalIndex(root / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        yield idx, kb


def perceive(kb, *names):
    embs = TinyImageEncoder().encode([kb / "images" / f"{n.lower()}.png" for n in names])
    return [Perception("looks like: shape (0.90)", e) for e in embs]


CFG = Config.resolve(env={})
BRIDGE = Question("q-bridge", "<image> What is the capital of the country where this tower stands?", ("t.jpg",),
                  "Fredville", ("Fredville",), "Bridge", "String")


def test_question_terms_drop_stopwords_and_the_image_entity_type():
    assert question_terms(BRIDGE.problem) == ["capital", "country", "stands"]
    assert question_terms("<image><image> Which of these two countries has the larger population?") == \
        ["population"]
    assert question_terms("In this image, which river is it?") == ["river"]
    assert question_terms("<image><image> Tell me whether both flamingos shown share a family: yes or no?") == \
        ["flamingos", "family"]


def test_bridge_found_through_the_passage_that_names_the_bridge_entity(world):
    idx, kb = world
    assert BRIDGE.extra == {}  # no template, no chain: only the answer guides the search
    d = discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower"))
    assert d is not None
    assert [k for k, _ in d.path] == ["image_search", "text_search", "text_search", "answer"]
    assert d.path[0] == ("image_search", "1") and d.path[-1] == ("answer", "Fredville")
    assert d.path[1][1].startswith("Zorgtower") and d.path[2][1].startswith("Freedonia")
    assert "Freedonia" in d.reason
    for turn, (kind, arg) in zip(d.turns, d.path):
        act = grammar.parse_action(turn, 1)
        assert (act.kind, act.argument) == (kind, arg) and act.think  # each turn reasons, then acts once
    assert "Zorgtower" in d.turns[1] and '"Zorgtower is a tower in Freedonia."' in d.turns[2]
    assert "Freedonia" in d.turns[3].split("<answer>")[0]
    # Deterministic, and the same with a shared search cache.
    cache = {}
    assert discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower"), cache) == d
    assert discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower"), cache) == d

    # The turns replayed through the real loop see what discovery saw and reach the answer.
    gen = ScriptedGenerator(d.turns)
    eps = []
    tr = answer(BRIDGE.problem, gen, idx, CFG, perceive(kb, "Zorgtower"), episode_out=eps)
    assert tr.answer == "Fredville"
    assert [(h.action, h.argument) for h in tr.hops] == d.path
    assert [t for t, by_policy in eps[0].segments if by_policy] == d.turns
    assert "Freedonia" in [r["title"] for r in tr.hops[2].results]
    info = [t for t, by_policy in eps[0].segments if not by_policy]
    assert "Fredville" in info[-1] and "Fredville" not in "".join(info[:-1])


def test_discovered_episode_replays_with_the_teacher(world):
    idx, kb = world
    got = discovered_episode(BRIDGE, grammar.render_chatml, lambda s: len(s.split()), idx, CFG,
                             perceive(kb, "Zorgtower"))
    assert got is not None
    ep, tr = got
    assert tr.answer == "Fredville" and [h.action for h in tr.hops][-1] == "answer"
    assert ep.prompt.startswith("<|im_start|>system")


def test_failures_say_why(world):
    idx, kb = world
    why = []
    nowhere = Question("q-none", "<image> Who designed this tower?", ("t.jpg",), "Gustave Noname",
                       ("Gustave Noname",), "Bridge", "String")
    assert discover_turns(nowhere, idx, CFG, perceive(kb, "Zorgtower"), failures=why) is None
    assert why == ["answer not in KB text"]
    # In the KB, but not reachable from this image within one text search.
    assert discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower"), max_text_searches=1, failures=why) is None
    assert why[-1] == "answer not found within 1 searches"
    assert discover_turns(BRIDGE, idx, CFG, [], failures=why) is None and why[-1] == "no image entity"
    short = Config.resolve(flags={"loop.max_turns": 2}, env={})
    assert discover_turns(BRIDGE, idx, short, perceive(kb, "Zorgtower"), failures=why) is None
    assert "max_turns" in why[-1]


def test_compare_reads_both_entities_and_copies_their_numbers(world):
    idx, kb = world
    q = Question("q-cmp", "<image><image> Which of these two countries has the larger population?",
                 ("a.jpg", "b.jpg"), "Freedonia", ("Freedonia",), "Compare", "String")
    d = discover_turns(q, idx, CFG, perceive(kb, "Freedonia", "Sylvania"))
    assert d is not None
    assert d.path[:2] == [("image_search", "1"), ("image_search", "2")]
    assert [a.split()[0] for k, a in d.path if k == "text_search"] == ["Freedonia", "Sylvania"]
    assert d.path[-1] == ("answer", "Freedonia")
    assert "2,500,000" in d.turns[-1] and "1,200,000" in d.turns[-1]
    tr = answer(q.problem, ScriptedGenerator(d.turns), idx, CFG, perceive(kb, "Freedonia", "Sylvania"))
    assert tr.answer == "Freedonia" and [(h.action, h.argument) for h in tr.hops] == d.path
    # A label the numbers read contradict is not taught.
    why = []
    wrong = Question("q-cmp2", q.problem, q.images, "Sylvania", ("Sylvania",), "Compare", "String")
    assert discover_turns(wrong, idx, CFG, perceive(kb, "Freedonia", "Sylvania"), failures=why) is None
    assert why == ["the numbers read contradict the answer"]


def test_numerical_answer_is_a_number_in_range_read_on_the_path(world):
    idx, kb = world
    q = Question("q-num", "<image> What is the population of the country where this tower stands?", ("t.jpg",),
                 "2.5 million", (2400000, 2600000), "Bridge", "Numerical")
    d = discover_turns(q, idx, CFG, perceive(kb, "Zorgtower"))
    assert d is not None and d.path[-1] == ("answer", "2.5 million")
    assert [a.split()[0] for k, a in d.path if k == "text_search"] == ["Zorgtower", "Freedonia"]
    tr = answer(q.problem, ScriptedGenerator(d.turns), idx, CFG, perceive(kb, "Zorgtower"))
    assert tr.answer == "2.5 million"
    # A range no passage's number falls in (the tower's 324 metres is read, but is not a population).
    far = Question("q-num2", q.problem, q.images, "9 million", (8900000, 9100000), "Bridge", "Numerical")
    assert discover_turns(far, idx, CFG, perceive(kb, "Zorgtower")) is None


def test_rejection_sampling_keeps_the_shortest_correct_supported_rollout(world):
    idx, kb = world
    good = discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower")).turns
    lucky = Question("q-lucky", "<image> Who designed this tower?", ("t.jpg",), "Gustave Noname",
                     ("Gustave Noname",), "Bridge", "String")
    replies = (["<think>Guess.</think><answer>Sylport</answer>"]  # BRIDGE rollout 1: wrong
               + good  # rollout 2: right
               + ["no action at all"] + good[1:]  # rollout 3: right, but after a corrected invalid turn
               + ["<answer>Gustave Noname</answer>", "<answer>x</answer>", "<answer>y</answer>"])  # lucky: no support
    gen = ScriptedGenerator(replies)
    got = rejection_sample([BRIDGE, lucky], gen, idx, CFG, lambda q: perceive(kb, "Zorgtower"), samples=3)
    assert [q.id for q, _ in got] == ["q-bridge"]
    ep = got[0][1]
    assert ep.answer == "Fredville" and [t for t, by_policy in ep.segments if by_policy] == good
    assert not gen.replies  # every rollout ran
    # Without the support check, the lucky guess is kept too.
    gen = ScriptedGenerator(["<answer>Gustave Noname</answer>"])
    got = rejection_sample([lucky], gen, idx, CFG, lambda q: perceive(kb, "Zorgtower"), samples=1,
                           require_support=False)
    assert [q.id for q, _ in got] == ["q-lucky"]


def test_rejection_sampling_drops_an_answer_the_loop_forced(world):
    idx, kb = world
    good = discover_turns(BRIDGE, idx, CFG, perceive(kb, "Zorgtower")).turns
    searches = [t for t in good if "<answer>" not in t]
    short = Config.resolve(flags={"loop.max_turns": len(searches)}, env={})
    # The rollout runs out of turns after the right searches; the loop asks, and it answers right.
    gen = ScriptedGenerator(searches + ["Fredville</answer>"])
    got = rejection_sample([BRIDGE], gen, idx, short, lambda q: perceive(kb, "Zorgtower"), samples=1)
    assert got == [] and not gen.replies
    gen = ScriptedGenerator(good)  # the same path, answered by the policy itself, is kept
    enough = Config.resolve(flags={"loop.max_turns": len(good)}, env={})
    got = rejection_sample([BRIDGE], gen, idx, enough, lambda q: perceive(kb, "Zorgtower"), samples=1)
    assert [q.id for q, _ in got] == ["q-bridge"]
