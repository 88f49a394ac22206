"""Every test has one category (unit, integration, gui or training; tests/conftest.py gives each file's), so
`make test-fast` (`-m unit`) cannot silently miss a new file nor run a slow test by accident."""
from pathlib import Path

from conftest import CATEGORIES, FILE_CATEGORIES

TESTS = Path(__file__).resolve().parent


def test_every_test_file_has_a_category():
    files = sorted(p.name for p in TESTS.glob("test_*.py"))
    missing = [name for name in files if name not in FILE_CATEGORIES]
    assert not missing, f"add these to FILE_CATEGORIES in tests/conftest.py: {missing}"
    assert sorted(FILE_CATEGORIES) == files, "FILE_CATEGORIES names files that do not exist"
    for name, markers in FILE_CATEGORIES.items():
        own = [m for m in markers.split() if m in CATEGORIES]
        assert len(own) == 1 and set(markers.split()) <= {*CATEGORIES, "data"}, (name, markers)


def test_every_collected_test_has_exactly_one_category(request):
    """The tests this session collected (all of them under `make test`)."""
    wrong = {item.nodeid: names for item in request.session.items
             if len(names := [m.name for m in item.iter_markers() if m.name in CATEGORIES]) != 1}
    assert not wrong, f"tests with no category or several: {wrong}"
