"""Task declarations load offline, prompts are built as declared, demo sampling is seeded and balanced."""

from collections import Counter

import pytest

from datamodules.icl_tasks import (
    OFFLINE_TASKS,
    TASKS,
    Example,
    ICLTask,
    TaskLoadError,
    build_work_units,
    get_task,
    load_examples,
    permutations,
    sample_demos,
    split_test_and_pool,
)


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_tasks_load_with_every_label(name):
    task = TASKS[name]
    examples = load_examples(task)
    assert len(examples) > 1000
    assert set(Counter(e.label for e in examples)) == set(range(task.num_classes))
    assert isinstance(task.render_input(examples[0]), str)


def test_offline_set_is_the_expected_one():
    assert set(OFFLINE_TASKS) == {"sst2", "sst5", "mr", "subj", "trec", "agnews"}
    sst2 = load_examples(TASKS["sst2"])
    assert len(sst2) == 67349  # GLUE SST-2 train


def test_prompt_format_matches_declaration():
    task = ICLTask(
        "t",
        "staicc:sst2",
        label_words=("neg", "pos"),
        template="R: {text}\nS:",
        target_delimiter=" ",
        demo_separator="\n\n",
    )
    d1, d2, q = Example(0, {"text": "a"}, 1), Example(1, {"text": "b"}, 0), Example(2, {"text": "c"}, 1)
    assert task.context([d1, d2], q) == "R: a\nS: pos\n\nR: b\nS: neg\n\nR: c\nS:"
    assert task.context([], q) == "R: c\nS:"
    assert task.choices() == [" neg", " pos"]


def test_bad_declarations_fail_clearly():
    with pytest.raises(ValueError, match="label_words"):
        ICLTask("x", "staicc:sst2", label_words=("a",))
    with pytest.raises(ValueError, match="unknown ICL task"):
        get_task("nope")
    with pytest.raises(ValueError, match="field"):
        ICLTask("x", "staicc:sst2", label_words=("a", "b"), template="{sentence}").render_input(
            Example(0, {"text": "t"}, 0)
        )
    assert get_task({"name": "y", "source": "staicc:sst2", "label_words": ["a", "b"]}).label_words == (
        "a",
        "b",
    )


def test_online_task_fails_with_one_line_naming_offline_tasks(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = ICLTask(
        "cbx",
        "hf:nonexistent-org/nonexistent/cb:train",
        input_fields=("premise", "hypothesis"),
        label_words=("true", "false", "neither"),
    )
    with pytest.raises(TaskLoadError) as info:
        load_examples(task)
    msg = str(info.value)
    assert "\n" not in msg and "sst2" in msg and "agnews" in msg


def test_demo_sampling_seeded_balanced_and_disjoint_from_test():
    task = TASKS["sst5"]
    examples = load_examples(task)
    test, pool = split_test_and_pool(examples, 25, task.num_classes, seed=0)
    assert Counter(e.label for e in test) == dict.fromkeys(range(5), 5)
    test_ids = {e.index for e in test}
    for n in (1, 3, 7, 16):
        a = sample_demos(pool, n, task.num_classes, seed=1)
        assert [e.index for e in a] == [e.index for e in sample_demos(pool, n, task.num_classes, seed=1)]
        assert [e.index for e in a] != [e.index for e in sample_demos(pool, n, task.num_classes, seed=2)]
        counts = Counter(e.label for e in a)
        assert len(a) == n and max(counts.values()) - min(counts.get(c, 0) for c in range(5)) <= 1
        assert not test_ids & {e.index for e in a}


def test_work_units_cover_the_grid_with_one_test_set():
    units = build_work_units(
        ["sst2", "mr"],
        [1, 4],
        [0, 1],
        n_test=8,
        order_n_demos=4,
        n_permutations=3,
        model_variants=("pretrained", "random_init"),
    )
    sweeps = [u for u in units if u.kind == "sweep"]
    orders = [u for u in units if u.kind == "order"]
    assert len(sweeps) == 2 * 2 * 2 * 2 and len(orders) == 2 * 2
    assert len({u.uid for u in units}) == len(units)
    sst2 = [u for u in sweeps if u.task.name == "sst2"]
    assert all([e.index for e in u.test] == [e.index for e in sst2[0].test] for u in sst2)
    for u in units:
        assert not {e.index for e in u.test} & {e.index for e in u.demos}
    assert orders[0].orders[0] == [0, 1, 2, 3] and len({tuple(o) for o in orders[0].orders}) == 3


def test_permutations_are_distinct_and_capped():
    assert permutations(2, 10, 0) == [[0, 1], [1, 0]]
    ps = permutations(5, 6, 3)
    assert len({tuple(p) for p in ps}) == 6 and all(sorted(p) == list(range(5)) for p in ps)
