"""The datamodule that feeds the ICL-vs-GD probe: test splits, demonstration sets, orders, work units.

Tasks and their example sources are declared in :mod:`datamodules.icl_task_catalog` (re-exported here).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from common.errors import UserFacingError
from datamodules.icl_task_catalog import (  # noqa: F401 - re-exported: callers import the task API from here
    OFFLINE_TASKS,
    REQUIRED_TASK_FIELDS,
    TASK_FIELDS,
    TASKS,
    Example,
    ICLTask,
    TaskLoadError,
    get_task,
    load_examples,
    staicc_files,
    task_from_dict,
)


def balanced_sample(
    examples: Sequence[Example], n: int, num_classes: int, rng: random.Random
) -> list[Example]:
    """``n`` examples with class counts differing by at most one, in a random order.

    The remainder ``n mod num_classes`` goes to randomly chosen classes, so N=1 on a binary task picks a
    random class rather than always class 0.
    """
    by_class: dict[int, list[Example]] = {c: [] for c in range(num_classes)}
    for e in examples:
        by_class[e.label].append(e)
    present = [c for c in range(num_classes) if by_class[c]]
    counts = dict.fromkeys(present, n // len(present))
    for c in rng.sample(present, n % len(present)):
        counts[c] += 1
    picked: list[Example] = []
    for c in present:
        if counts[c] > len(by_class[c]):
            raise ValueError(f"asked for {counts[c]} examples of class {c} but only {len(by_class[c])} exist")
        picked.extend(rng.sample(by_class[c], counts[c]))
    rng.shuffle(picked)
    return picked


def split_test_and_pool(
    examples: Sequence[Example], n_test: int, num_classes: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """A class-balanced test set and the disjoint pool demonstrations are drawn from."""
    test = balanced_sample(examples, n_test, num_classes, random.Random(f"test-{seed}"))
    taken = {e.index for e in test}
    return test, [e for e in examples if e.index not in taken]


def sample_demos(pool: Sequence[Example], n: int, num_classes: int, seed: int) -> list[Example]:
    """The seeded, class-balanced demonstration set ``seed`` of size ``n`` (order = the given order)."""
    return balanced_sample(pool, n, num_classes, random.Random(f"demos-{n}-{seed}"))


def permutations(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` distinct orders of ``range(n)``, the identity first (fewer when n! < count)."""
    import math

    count = min(count, math.factorial(n))
    rng = random.Random(f"perm-{n}-{seed}")
    orders = [list(range(n))]
    seen = {tuple(orders[0])}
    while len(orders) < count:
        p = list(range(n))
        rng.shuffle(p)
        if tuple(p) not in seen:
            seen.add(tuple(p))
            orders.append(p)
    return orders


@dataclass
class WorkUnit:
    """One independent piece of probe work, small enough to ship to any DDP rank.

    ``kind == "sweep"``: zero-shot, ICL and GD on ``demos`` for every test example.
    ``kind == "order"``: the same demos in each order of ``orders``; ICL, full-batch GD and SGD-in-order.
    """

    uid: str
    kind: str
    task: ICLTask
    n_demos: int
    seed: int
    model_variant: str
    demos: list[Example]
    test: list[Example]
    orders: list[list[int]]
    selection: GDSelectionData | None = None


@dataclass
class GDSelectionData:
    """Held-out data on which GD's step size is chosen for one task (shared by all of its units).

    ``dev`` is class-balanced and disjoint from the test set; each N of the sweep has its own
    demonstration sets ``demos[N]`` (several draws) from the rest of the pool (disjoint from ``dev``
    too), so the step size is chosen on data the reported numbers never see. How far a few GD steps
    move the model depends on which N examples it saw as much as on the step size; averaging over
    draws keeps one lucky or unlucky demonstration set from deciding the step size of a whole task.
    """

    dev: list[Example]
    demos: dict[int, list[list[Example]]]


def selection_data(
    pool: Sequence[Example], n_dev: int, n_demos: Sequence[int], num_classes: int, seed: int, n_sets: int = 1
) -> GDSelectionData:
    """The dev set and ``n_sets`` demonstration sets per N for GD step-size selection (seeded, balanced)."""
    dev = balanced_sample(pool, n_dev, num_classes, random.Random(f"dev-{seed}"))
    taken = {e.index for e in dev}
    rest = [e for e in pool if e.index not in taken]
    demos = {
        n: [
            balanced_sample(rest, n, num_classes, random.Random(f"select-{n}-{seed}" + (f"-{k}" if k else "")))
            for k in range(n_sets)
        ]
        for n in n_demos
        if n
    }
    return GDSelectionData(dev, demos)


def build_work_units(
    tasks: Sequence[str | ICLTask | dict],
    n_demos: Sequence[int],
    seeds: Sequence[int],
    n_test: int,
    test_seed: int = 0,
    order_n_demos: int | None = None,
    n_permutations: int = 0,
    model_variants: Sequence[str] = ("pretrained",),
    order_model_variants: Sequence[str] | None = None,
    n_dev: int = 0,
    n_selection_sets: int = 1,
) -> list[WorkUnit]:
    """Every (task, N, seed, model variant) sweep unit plus one order unit per (task, variant).

    The test set depends only on the task and ``test_seed``, so all N and seeds are scored on the same
    examples; demonstrations come from the rest, so a test example is never a demonstration. With
    ``n_dev > 0`` every unit also carries the task's GD step-size selection data (dev set and
    ``n_selection_sets`` demonstration sets per N).
    """
    units: list[WorkUnit] = []
    for spec in tasks:
        task = get_task(spec)
        examples = load_examples(task)
        test, pool = split_test_and_pool(examples, n_test, task.num_classes, test_seed)
        selection = (
            selection_data(pool, n_dev, n_demos, task.num_classes, test_seed, n_selection_sets) if n_dev else None
        )
        for variant in model_variants:
            for n in n_demos:
                for seed in seeds:
                    demos = sample_demos(pool, n, task.num_classes, seed)
                    units.append(
                        WorkUnit(
                            f"{task.name}/n{n}/s{seed}/{variant}",
                            "sweep",
                            task,
                            n,
                            seed,
                            variant,
                            demos,
                            test,
                            [list(range(n))],
                            selection,
                        )
                    )
            if n_permutations > 1 and order_n_demos and variant in (order_model_variants or model_variants):
                demos = sample_demos(pool, order_n_demos, task.num_classes, seeds[0])
                units.append(
                    WorkUnit(
                        f"{task.name}/order/n{order_n_demos}/{variant}",
                        "order",
                        task,
                        order_n_demos,
                        seeds[0],
                        variant,
                        demos,
                        test,
                        permutations(order_n_demos, n_permutations, seeds[0]),
                        selection,
                    )
                )
    return units


class _Units(Dataset):
    def __init__(self, units: list[WorkUnit]) -> None:
        self.units = units

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> WorkUnit:
        return self.units[i]


def _first(batch: list[WorkUnit]) -> WorkUnit:
    return batch[0]


class ICLTaskDataModule(L.LightningDataModule):
    """Feeds probe work units (one per test step); Lightning's distributed sampler splits them by rank.

    Args:
        tasks: Task names from ``TASKS`` (offline: sst2, sst5, mr, subj, trec, agnews; online also cb,
            rte) or ``ICLTask`` field dicts.
        n_demos: The sweep over the number of demonstrations N.
        seeds: One demonstration set per seed for each N.
        n_test: Class-balanced test examples per task (shared by all N and seeds).
        test_seed: Seed of the test split.
        order_n_demos: N of the order-sensitivity experiment (None or 0 disables it).
        n_permutations: Orders of that demonstration set (identity included).
        random_init_control: Also run every sweep unit on a randomly initialised model of the same
            architecture (Deutch et al.: similarity metrics need that baseline).
        order_on_random_init: Also run the order experiment on the random-init model (costly: every
            order fine-tunes twice).
        n_dev: Class-balanced held-out examples per task (disjoint from the test set) on which the probe
            chooses GD's step size when it has a grid (``gd_lr_grid``); 0 ships no selection data.
        n_selection_sets: Demonstration sets per N on which each candidate step size is tried (their
            dev results are averaged: one draw's luck then decides less).
    """

    def __init__(
        self,
        tasks: list[str | dict] = ("sst2",),
        n_demos: list[int] = (1, 4),
        seeds: list[int] = (0,),
        n_test: int = 128,
        test_seed: int = 0,
        order_n_demos: int | None = 4,
        n_permutations: int = 4,
        random_init_control: bool = True,
        order_on_random_init: bool = False,
        n_dev: int = 64,
        n_selection_sets: int = 2,
    ) -> None:
        super().__init__()
        for spec in tasks:
            get_task(spec)  # a misspelt task fails here, in one line, before any model is loaded
        if not n_demos or min(n_demos) < 0 or not seeds or n_test < 1 or n_dev < 0 or n_permutations < 0 \
                or n_selection_sets < 1:
            raise UserFacingError(
                f"ICL data needs n_demos >= 0 (non-empty), seeds (non-empty), n_test >= 1, n_dev >= 0, "
                f"n_permutations >= 0 and n_selection_sets >= 1; got n_demos={list(n_demos)}, seeds={list(seeds)}, "
                f"n_test={n_test}, n_dev={n_dev}, n_permutations={n_permutations}, n_selection_sets={n_selection_sets}"
            )
        self.save_hyperparameters()
        self.units: list[WorkUnit] = []

    @override
    def setup(self, stage: str) -> None:
        hp = self.hparams
        variants = ("pretrained", "random_init") if hp.random_init_control else ("pretrained",)
        self.units = build_work_units(
            list(hp.tasks),
            list(hp.n_demos),
            list(hp.seeds),
            hp.n_test,
            hp.test_seed,
            hp.order_n_demos,
            hp.n_permutations,
            variants,
            variants if hp.order_on_random_init else ("pretrained",),
            hp.n_dev,
            hp.n_selection_sets,
        )

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Units(self.units), batch_size=1, shuffle=False, collate_fn=_first)
