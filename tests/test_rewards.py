"""The reward table: built-in parts, weights and options from --reward, and a new part added by registering it."""
import pytest

from mmhops_lite import rewards
from mmhops_lite.errors import InputError
from mmhops_lite.rewards import REWARDS, Weights, reward, total_reward
from mmhops_lite.types import Hop, Question, Trace

Q = Question("q1", "<image> What is the capital of the country whose flag is shown?", ("a.png",), "Paris",
             ("Paris",), extra={"gold_entities": ["France"], "gold_passages": ["wiki:france"]})


def trace(answer, searches=True):
    hops = [Hop("image_search", "1", ({"id": "flag:fr", "title": "France", "score": 0.9},),
                raw="<think>a flag</think><image_search>1</image_search>"),
            Hop("text_search", "France capital", ({"id": "wiki:france", "title": "France", "score": 0.8},),
                raw="<think>France</think><text_search>France capital</text_search>")] if searches else []
    hops.append(Hop("answer", answer or "", raw=f"<answer>{answer}</answer>"))
    return Trace(Q.problem, hops=tuple(hops), answer=answer)


def test_builtin_parts_and_their_weighted_sum():
    right = total_reward(trace("Paris"), Q)
    assert (right["outcome"], right["format"], right["action"], right["correct"]) == (1.0, 1.0, 1.0, 1.0)
    assert right["total"] == pytest.approx(1.0 + 0.2 + 0.3)
    wrong = total_reward(trace("Lyon"), Q)
    assert (wrong["outcome"], wrong["action"], wrong["correct"]) == (0.0, 0.0, 0.0)  # tools pay only when right
    assert wrong["total"] == pytest.approx(0.2)
    w = Weights.parse("format=0, action=1")
    assert total_reward(trace("Paris"), Q, w)["total"] == pytest.approx(2.0)


def test_options_switch_partial_credit_and_are_recorded():
    q = Question("q2", "who?", (), "Alexandre Gustave Eiffel", ("Alexandre Gustave Eiffel",))
    tr = Trace(q.problem, hops=(Hop("answer", "Gustave Eiffel", raw="<answer>Gustave Eiffel</answer>"),),
               answer="Gustave Eiffel")
    assert total_reward(tr, q)["outcome"] == 0.0
    assert total_reward(tr, q, Weights.parse("f1=1"))["outcome"] == pytest.approx(0.8)
    assert Weights.parse("f1=1,coverage=1").to_dict()["coverage"] is True


def test_bad_weights_name_the_known_parts():
    with pytest.raises(InputError, match="unknown reward part 'speed'") as exc:
        Weights.parse("speed=1")
    assert "outcome" in str(exc.value) and "coverage" in str(exc.value)
    with pytest.raises(InputError, match="needs a number"):
        Weights.parse("action=lots")


def test_a_new_part_is_one_function_and_one_table_entry(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))  # registered for this test only

    @rewards.reward("brevity", weight=0.5, help="1 when the episode took at most two turns")
    def brevity(ep):
        return float(len(ep.trace.hops) <= 2)

    short, long_ = total_reward(trace("Paris", searches=False), Q), total_reward(trace("Paris"), Q)
    assert short["brevity"] == 1.0 and long_["brevity"] == 0.0
    assert short["total"] - long_["total"] == pytest.approx(0.5 - 0.3)  # brevity paid, action (no searches) not
    assert Weights.parse("brevity=2").of("brevity") == 2.0  # --reward knows it at once
    assert rewards.part_names(short) == ["outcome", "format", "action", "brevity"]
    assert Weights().to_dict()["brevity"] == 0.5
    with pytest.raises(ValueError):
        reward("total")
