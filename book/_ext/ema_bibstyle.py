"""A bibliography whose labels match the book's author-year citations.

The book cites "Mushtaq et al. (2026)" (sphinxcontrib-bibtex's ``author_year`` referencing
style), but pybtex's default label style prints the bibliography's entries as "[AOS+24]", which
a reader cannot match to the text. This Sphinx extension registers the pybtex formatting style
``ema_author_year``: the ``unsrt`` style sorted by author and year, labelled "Mushtaq et al.
2026". ``_config.yml`` loads it (``sphinx.local_extensions``) and names it in
``bibtex_default_style``.
"""

from __future__ import annotations

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person) -> str:
    return " ".join(person.prelast_names + person.last_names) or str(person)


def author_year(entry) -> str:
    """"Soligo et al. 2026", "Zhang and Li 2024", "Souly 2024"; the key when it has no author."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_surname(p).replace("{", "").replace("}", "") for p in people]
    if not names:
        who = entry.key
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    year = entry.fields.get("year", "")
    return f"{who} {year}".strip()


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        seen: dict[str, int] = {}
        for entry in sorted_entries:
            label = author_year(entry)
            seen[label] = seen.get(label, 0) + 1
            # two works by the same authors in one year: 2024, 2024b
            yield label if seen[label] == 1 else f"{label}{chr(ord('a') + seen[label] - 1)}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = "ema_author_year"
    default_sorting_style = "author_year_title"


def setup(app):
    register_plugin("pybtex.style.labels", "ema_author_year", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "ema_author_year", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
