"""The suite's schedule hint (tests/conftest.py: LONGEST_FIRST) names test files that exist, each once."""

from tests.conftest import LONGEST_FIRST, REPO


def test_the_longest_first_files_exist_and_are_named_once():
    missing = [name for name in LONGEST_FIRST if not (REPO / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
