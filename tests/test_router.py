"""Routing rules: pure, so tested directly with file versions."""

from __future__ import annotations

from pathlib import Path

from filedispatch.config import parse_config
from filedispatch.models import FileVersion
from filedispatch.router import Facts, Router


def v(relpath: str, size: int = 100, source: str = "in") -> FileVersion:
    return FileVersion(source, Path("/in"), relpath, size, 0)


def router(*rules: dict[str, object], sources: list[dict[str, object]] | None = None) -> Router:
    return Router(
        parse_config({"sources": sources or [{"path": "/in", "name": "in"}], "rules": list(rules)})
    )


def rules_for(r: Router, version: FileVersion, facts: Facts | None = None) -> list[str]:
    return [c.rule for c in r.route(version, facts or Facts())]


def test_extensions_are_case_insensitive_and_first_match_wins() -> None:
    r = router(
        {"name": "img", "extensions": ["jpg"], "to": "/a"}, {"name": "all", "glob": "*", "to": "/b"}
    )
    assert rules_for(r, v("x/PHOTO.JPG")) == ["img"]
    assert rules_for(r, v("notes.txt")) == ["all"]
    assert rules_for(r, v("noext")) == ["all"]


def test_continue_sends_to_several_rules() -> None:
    r = router(
        {"name": "backup", "glob": "*", "continue": True, "to": "/backup"},
        {"name": "pdf", "extensions": ["pdf"], "to": "/pdf"},
        {"name": "rest", "glob": "*", "to": "/rest"},
    )
    assert rules_for(r, v("a.pdf")) == ["backup", "pdf"]
    assert rules_for(r, v("a.doc")) == ["backup", "rest"]


def test_glob_regex_exclude_and_sizes() -> None:
    r = router(
        {
            "name": "edi",
            "glob": "batches/**/*.edi",
            "regex": r"^batches/\d{4}/",
            "exclude": ["*test*"],
            "min_size": "1KB",
            "max_size": "1MB",
            "to": "/edi",
        }
    )
    assert rules_for(r, v("batches/2026/a/b.edi", 2048)) == ["edi"]
    assert rules_for(r, v("batches/2026/b.edi", 2048)) == ["edi"]
    assert rules_for(r, v("batches/2026/test-b.edi", 2048)) == []
    assert rules_for(r, v("batches/26/b.edi", 2048)) == []
    assert rules_for(r, v("batches/2026/b.edi", 10)) == []
    assert rules_for(r, v("batches/2026/b.edi", 2 * 1024**2)) == []


def test_rule_limited_to_a_source() -> None:
    r = router(
        {"name": "a", "sources": ["scans"], "glob": "*", "to": "/a"},
        {"name": "b", "glob": "*", "to": "/b"},
        sources=[{"path": "/in", "name": "in"}, {"path": "/scans", "name": "scans"}],
    )
    assert rules_for(r, v("x.pdf", source="scans")) == ["a"]
    assert rules_for(r, v("x.pdf", source="in")) == ["b"]


def test_mime_rule_uses_detected_type() -> None:
    r = router(
        {"name": "pdf", "mime": "application/pdf", "to": "/pdf"},
        {"name": "img", "mime": ["image/*"], "to": "/img"},
    )
    assert r.needs_mime
    assert rules_for(r, v("scan"), Facts(mime="application/pdf")) == ["pdf"]
    assert rules_for(r, v("scan"), Facts(mime="image/png")) == ["img"]
    assert rules_for(r, v("scan"), Facts(mime=None)) == []


def test_explain_gives_reasons() -> None:
    r = router(
        {"name": "img", "extensions": ["png"], "to": "/a"},
        {"name": "small", "max_size": 10, "to": "/b"},
        {"name": "all", "glob": "*", "to": "/c"},
    )
    checks = r.explain(v("a.txt", 50))
    assert [(c.rule, c.matched) for c in checks] == [
        ("img", False),
        ("small", False),
        ("all", True),
    ]
    assert "extension 'txt'" in checks[0].why and "above max_size" in checks[1].why


def test_step_keys_differ_when_an_earlier_transform_differs() -> None:
    r = router(
        {"name": "a", "glob": "*.x", "to": [{"compress": "gzip"}, "/out"]},
        {"name": "b", "glob": "*", "to": "/out"},
    )
    (a,) = r.route(v("f.x"))
    (b,) = r.route(v("f.y"))
    assert a.keys[1] != b.keys[0]


def test_a_learned_rule_matches_when_its_label_reaches_min_confidence() -> None:
    from filedispatch.learn.extract import Document
    from filedispatch.learn.model import Prediction

    r = router(
        {
            "name": "learned",
            "classify": {"learn": "/examples", "min_confidence": 0.75},
            "to": {"url": "/out", "name": "{label}/{name}"},
        },
        {"name": "rest", "to": "/rest"},
    )

    def facts(probability: float | None) -> Facts:
        if probability is None:  # no model yet
            return Facts(learned={"learned": None})
        ranked = (("invoices", probability), ("contracts", 1 - probability))
        answer = Prediction("invoices", probability, ranked, Document("a", "text"))
        return Facts(learned={"learned": answer})

    reached = r.route(v("a.txt"), facts(0.75))
    assert [(c.rule, c.label) for c in reached] == [("learned", "invoices")]
    for below in (0.7499, None):  # below it, or no answer: the next rule, without a label
        assert [(c.rule, c.label) for c in r.route(v("a.txt"), facts(below))] == [("rest", None)]
    # the default is 0.6
    default = router({"classify": {"learn": "/examples"}, "to": "/out"})
    assert default.learners["rule-1"].min_confidence == 0.6
