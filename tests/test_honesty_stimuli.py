"""Stimuli: reproducible per seed, every utterance's truth right, options shuffled and recorded."""

import re

import numpy as np
import pytest

from datamodules.honesty_paradigms import ALL_UTTERANCES, Utterance, object_rewards, relevance
from datamodules.honesty_prompts import build_messages, parse_answer, render_prompt
from datamodules.honesty_trials import signaling_trials, time_trials


def test_same_seed_same_trials_other_seed_different():
    a = [t.to_dict() for t in signaling_trials(6, seed=7, cot=(False, True), n_options=5)]
    b = [t.to_dict() for t in signaling_trials(6, seed=7, cot=(False, True), n_options=5)]
    c = [t.to_dict() for t in signaling_trials(6, seed=8, cot=(False, True), n_options=5)]
    assert a == b and a != c
    assert [t.to_dict() for t in time_trials(5, seed=1)] == [t.to_dict() for t in time_trials(5, seed=1)]
    assert len({t["trial_id"] for t in a}) == len(a) == 6 * 3 * 2


def test_every_signaling_utterance_truth_and_relevance_is_right():
    for t in signaling_trials(25, seed=3):
        world = t.scenario["world"]
        assert len(t.options) == 30 and sorted(t.order) == list(range(30))
        for text, truth, rel, idx in zip(t.options, t.truth, t.relevance, t.order, strict=True):
            feature, value = re.fullmatch(r"(\w+) is ([+-]?\d)", text).groups()
            assert ALL_UTTERANCES[idx].text == text
            assert truth == (1.0 if world[feature] == int(value) else -1.0)
            objs = [_obj(name) for name in t.scenario["objects"]]
            assert rel == pytest.approx(
                relevance(tuple(world.values()), objs, Utterance(feature, int(value)))
            )
        assert sum(x > 0 for x in t.truth) == 6
        assert (
            object_rewards(tuple(world.values()), [_obj(n) for n in t.scenario["objects"]]).tolist()
            == t.scenario["object_rewards"]
        )


def _obj(name: str) -> tuple[int, int]:
    colour, texture = name.split()
    return ("green", "red", "blue").index(colour), ("spotted", "solid", "striped").index(texture)


def test_every_time_utterance_truth_is_right():
    for t in time_trials(40, seed=2, framings=("belief", "utility"), cot=(False, True)):
        true_time = t.scenario["true_time"]
        assert t.scenario["minutes"] % 5 != 0
        for text, truth, said in zip(t.options, t.truth, t.scenario["said_minutes"], strict=True):
            assert (truth > 0) == (text == f"It's {true_time}.")
            assert abs(said - t.scenario["minutes"]) <= 4
        assert sum(x > 0 for x in t.truth) == 1 and len(t.options) == 3
        assert t.cost == [1.0 if x > 0 else 0.5 for x in t.truth]


def test_option_orders_are_shuffled_and_subsets_hold_a_conflict():
    trials = signaling_trials(30, seed=0, framings=("ambiguous",), n_options=4)
    assert len({tuple(t.order) for t in trials}) > 20  # not a fixed order
    for t in trials:
        assert len(t.options) == 4 and any(x > 0 for x in t.truth) and any(x < 0 for x in t.truth)
    positions = [next(i for i, x in enumerate(t.truth) if x > 0) for t in time_trials(60, seed=0)]
    assert len(set(positions)) == 3  # the true option lands in every position


def test_conditions_and_bad_condition_names():
    t = time_trials(1, seed=0, framings=("utility",), contexts=("watch",), cot=(True,))[0]
    assert t.condition == "time/utility/watch/cot"
    with pytest.raises(ValueError, match="choose from"):
        signaling_trials(1, seed=0, framings=("honest",))
    with pytest.raises(ValueError, match="decision context"):
        time_trials(1, seed=0, contexts=("bus",))


def test_prompts_carry_framing_context_and_options():
    sig = signaling_trials(1, seed=0, framings=("utility",), n_options=6)[0]
    msgs = build_messages(sig, "letter")
    body = msgs[1]["content"]
    assert "worth the most" in body and "F. " + sig.options[5] in body and "letter" in body
    tm = time_trials(1, seed=0, contexts=("watch",), cot=(True,))[0]
    body = build_messages(tm, "text")[1]["content"]
    assert "set it" in body and "step by step" in body and all(f"- {o}" in body for o in tm.options)
    plain = render_prompt(msgs, chat=False)
    assert plain.endswith("Answer:") and msgs[0]["content"] in plain
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(msgs, tokenizer=None, chat=True)
    with pytest.raises(ValueError, match="A-Z"):
        build_messages(signaling_trials(1, seed=0)[0], "letter")


def test_parse_answer():
    t = signaling_trials(1, seed=0, n_options=5)[0]
    target = t.options[3]
    feature, value = target.split(" is ")
    assert parse_answer(t, f"I would say {feature.lower()}: {value.lstrip('+')}.") == 3
    assert parse_answer(t, f"Reasoning mentions nothing.\nAnswer: {target}") == 3
    assert parse_answer(t, "D", answer_format="letter") == 3
    assert parse_answer(t, "I like turtles") is None
    missing = next(u.text for u in ALL_UTTERANCES if u.text not in t.options)
    assert parse_answer(t, missing) is None  # not among the options
    tm = time_trials(1, seed=0)[0]
    hh_mm = tm.options[2][len("It's ") : -1]
    assert parse_answer(tm, f"It is {hh_mm} now") == 2
    assert np.isfinite(tm.relevance).all()


def test_prompts_come_from_the_declared_templates(monkeypatch):
    from datamodules import honesty_prompts

    trial = signaling_trials(1, seed=0, n_options=3)[0]
    monkeypatch.setitem(honesty_prompts.TEMPLATES, "letter_ask", "Reply with one letter.")
    user = build_messages(trial, "letter")[1]["content"]
    assert user.endswith("Reply with one letter.")  # the wording is data: changing it changes the prompt
    assert build_messages(trial, "text")[1]["content"].endswith(honesty_prompts.TEMPLATES["text_ask"])
