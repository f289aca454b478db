"""The bounds of every user-settable count live in one table (recommender/limits.py); the
README's copy is that table."""

from pathlib import Path

from recommender.limits import LIMITS, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_holds_the_table_of_bounds():
    text = README.read_text()
    start, end = text.index("<!-- limits -->\n") + len("<!-- limits -->\n"), text.index("\n<!-- /limits -->")
    assert text[start:end] == markdown_table(), "regenerate the README table: recommender.limits.markdown_table()"


def test_every_limit_has_a_reason_and_an_upper_bound():
    for name, lim in LIMITS.items():
        assert lim.why and lim.low <= lim.high and lim.high > 0, name
