"""A finished run destroys its process group itself instead of leaving it to interpreter shutdown."""

from pathlib import Path

import torch.distributed as dist

from common.process_group import release_process_group


def test_release_destroys_an_initialised_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    release_process_group()  # nothing up: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    release_process_group()
    assert not dist.is_initialized()
    release_process_group()


def test_train_py_releases_the_group_on_its_clean_exit_path() -> None:
    """The script's entry point: after ``main()`` returns (an error exits before it, leaving other ranks be)."""
    source = (Path(__file__).resolve().parent.parent / "train.py").read_text()
    entry = source[source.index('if __name__ == "__main__":'):]
    assert entry.split() == ['if', '__name__', '==', '"__main__":', 'main()', 'release_process_group()']
