"""Config loading: the seed format, the extended format, and errors a user can act on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from filedispatch.cluster import node_name
from filedispatch.config import (
    FtpDestination,
    HttpDestination,
    LocalDestination,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    redact_url,
    secrets_of,
)
from filedispatch.errors import ConfigError

from .conftest import run_cli, write_config

SEED = {
    "source": "/home/filedispatch/downloads",
    "folders": [
        {
            "path": "ftp://username:password@ftp.foo.org/home/user/videos",
            "extensions": ["mp4", "flv", "avi", "mov", "wmv", "webm", "mkv"],
        },
        {
            "path": "https://server/documents/audios",
            "extensions": ["mp3", "wav", "ogg"],
            "fieldname": "document",
        },
        {"path": "file:///tmp/documents/ebooks", "extensions": ["pdf", "djvu", "epub"]},
        {"path": "/tmp/documents/images", "extensions": ["png", "jpg", "jpeg", "gif", "svg"]},
    ],
}


def test_seed_format_maps_onto_sources_and_rules() -> None:
    config = parse_config(SEED)
    assert [s.path for s in config.sources] == [Path("/home/filedispatch/downloads")]
    kinds = [type(r.to[0]) for r in config.rules]
    assert kinds == [FtpDestination, HttpDestination, LocalDestination, LocalDestination]
    http = config.rules[1].to[0]
    assert isinstance(http, HttpDestination) and http.fieldname == "document"
    ebooks = config.rules[2].to[0]
    assert isinstance(ebooks, LocalDestination) and ebooks.folder == Path("/tmp/documents/ebooks")
    assert config.rules[0].extensions[0] == "mp4"
    assert "password" in secrets_of(config)


def test_extended_format_with_units_env_and_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTP_PASS", "s3cr3t-pass")
    config = parse_config(
        {
            "database": "/var/lib/fd/journal.db",
            "sources": [
                {
                    "path": "/data/in",
                    "name": "in",
                    "recursive": True,
                    "settle": 2,
                    "ready": "done",
                    "after": "move",
                    "done_dir": "/data/done",
                }
            ],
            "rules": [
                {
                    "name": "big",
                    "sources": ["in"],
                    "extensions": [".PDF"],
                    "min_size": "10KB",
                    "max_size": "2GB",
                    "continue": True,
                    "to": [
                        {"url": "ftp://u:${FTP_PASS}@h/x", "retry": {"attempts": 3, "delay": 0.5}}
                    ],
                },
                {"glob": "**/*.txt", "to": "/data/out"},
            ],
        }
    )
    rule = config.rules[0]
    assert rule.extensions == ["pdf"] and rule.continue_
    assert (rule.min_size, rule.max_size) == (10 * 1024, 2 * 1024**3)
    ftp = rule.to[0]
    assert isinstance(ftp, FtpDestination) and ftp.retry.attempts == 3
    assert ftp.display == "ftp://u:***@h/x"
    assert "s3cr3t-pass" not in repr(config)


def test_sizes() -> None:
    assert parse_size("512") == 512
    assert parse_size("1.5 MB") == int(1.5 * 1024**2)
    assert parse_size("3KiB") == 3072
    with pytest.raises(ValueError):
        parse_size("lots")


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("sftp://bob:hunter2@host:22/in") == "sftp://bob:***@host:22/in"
    assert redact_url("https://host/a?b=1") == "https://host/a?b=1"


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yml")
    return info.value.problems


def test_every_error_names_its_field_and_never_echoes_secrets() -> None:
    problems = problems_of(
        {
            "sources": [{"path": "/in", "settel": 1}],
            "rules": [
                {"to": ["/out"]},
                {"to": [{"url": "ftp://u:topsecret@h/x", "retry": {"attempts": "many"}}]},
                {"to": [{"url": "gopher://x"}]},
                {"min_size": "huge", "to": "/out"},
            ],
        }
    )
    text = "\n".join(problems)
    assert "sources[0].settel: unknown field" in text
    assert "rules[1].to[0].retry.attempts:" in text
    assert "rules[2].to[0]: not a destination" in text
    assert "rules[3].min_size:" in text
    assert "topsecret" not in text
    assert len(problems) == 4


def test_a_destination_inside_a_watched_source_is_a_loop() -> None:
    problems = problems_of({"sources": [{"path": "/in"}], "rules": [{"to": "/in"}]})
    assert "rules[0].to[0].url" in problems[0] and "loop" in problems[0]
    problems = problems_of(
        {"sources": [{"path": "/in", "recursive": True}], "rules": [{"to": "/in/sub"}]}
    )
    assert "loop" in problems[0]


def test_unknown_template_placeholder_and_missing_env() -> None:
    assert (
        "unknown placeholder {nmae}"
        in problems_of(
            {"sources": [{"path": "/in"}], "rules": [{"to": {"url": "/o", "name": "{nmae}"}}]}
        )[0]
    )
    problem = problems_of({"sources": [{"path": "${NO_SUCH_VAR_X}"}], "rules": [{"to": "/o"}]})[0]
    assert "sources[0].path" in problem and "NO_SUCH_VAR_X" in problem


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.yml", {"sources": [{"path": "./in"}], "rules": [{"to": "out"}]}
    )
    config = load_config(cfg)
    assert config.sources[0].path == tmp_path / "in"
    dest = config.rules[0].to[0]
    assert isinstance(dest, LocalDestination) and dest.folder == tmp_path / "out"


def test_the_node_and_its_lease() -> None:
    """``lease`` defaults to 30 s and takes units; ``node`` defaults to none (the host name)."""
    base = {"sources": [{"path": "/in"}], "rules": [{"to": "/out"}]}
    default = parse_config(base)
    assert (default.lease, default.node) == (30.0, None)
    assert node_name(default) == socket.gethostname()
    named = parse_config({**base, "lease": "2m", "node": "dispatch-a"})
    assert (named.lease, node_name(named)) == (120.0, "dispatch-a")
    assert parse_config({**base, "lease": 90}).lease == 90.0
    assert parse_config({**base, "lease": "1s"}).lease == 1.0
    for bad in (0, "-5s", "soon", 0.1, "500ms"):
        with pytest.raises(ConfigError, match="lease"):
            parse_config({**base, "lease": bad})


def test_every_duration_unit_parses_in_every_duration_field() -> None:
    """``ms``, ``min`` and ``w`` were matched by the pattern but missing from a second,
    shorter table of units defined later in config.py: ``settle: 5min`` or ``min_age: 1w``
    raised KeyError instead of loading (or being refused by name)."""
    units = {"500ms": 0.5, "30": 30.0, "30s": 30.0, "5m": 300.0, "5min": 300.0, "2h": 7200.0}
    units |= {"1d": 86400.0, "1w": 604800.0}
    for text, seconds in units.items():
        assert parse_duration(text) == seconds
        cfg = parse_config(
            {
                "sources": [{"path": "/in", "settle": text, "rescan": text}],
                "rules": [{"to": "/out", "min_age": text}],
                "lease": text if seconds >= 1 else 1,
            }
        )
        assert (cfg.sources[0].settle, cfg.rules[0].min_age) == (seconds, seconds)


def test_a_shared_source_cannot_turn_polling_off() -> None:
    """inotify does not see other hosts' writes to a shared folder: ``poll: false`` there
    would leave their files to the rescans, so it is refused, naming both keys."""
    source = {"path": "/mnt/nfs/in", "name": "in", "shared": True}
    rules = [{"to": "/out"}]
    assert parse_config({"sources": [{**source, "poll": True}], "rules": rules})
    with pytest.raises(ConfigError, match=r"sources\[0\].*poll: false cannot go with shared"):
        parse_config({"sources": [{**source, "poll": False}], "rules": rules})


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(
        "sources:\n  - path: /in\nrules:\n  - to:\n      - url: ftp://u:pw-9876@h/\n"
        "        retry: {attempts: -1}\n"
    )
    result = run_cli("-c", cfg)
    assert result.returncode == 2
    assert str(cfg) in result.stderr
    assert "rules[0].to[0].retry.attempts" in result.stderr
    assert "Traceback" not in result.stderr and "pw-9876" not in result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text("sources: [\n")
    result = run_cli("check", "-c", broken)
    assert result.returncode == 2 and "line" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("-c", tmp_path / "missing.yml")
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_check_prints_the_routing_table_redacted(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "sources": [{"path": str(tmp_path / "in"), "name": "in"}],
            "rules": [
                {
                    "name": "videos",
                    "extensions": ["mp4"],
                    "to": ["ftp://me:pa55word@ftp.example/v", str(tmp_path / "copy")],
                }
            ],
        },
    )
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 0, result.stderr
    assert "videos" in result.stdout and "extensions mp4" in result.stdout
    assert "ftp://me:***@ftp.example/v" in result.stdout
    assert "pa55word" not in result.stdout


def test_each_step_kind_is_declared_once_and_reaches_every_list() -> None:
    """A kind's model is the one place: its tag, processor, URL schemes and API protocol."""
    import importlib

    from filedispatch.api.queries import PROTOCOLS
    from filedispatch.config import STEP_KINDS, STEP_MODELS

    assert PROTOCOLS == STEP_KINDS
    assert len(set(STEP_KINDS)) == len(STEP_KINDS)
    for model in STEP_MODELS:
        module = importlib.import_module(f"filedispatch.processors.{model.processor}")
        assert callable(module.create), model
        for scheme in model.schemes:
            url = f"{scheme}://host/x" if scheme not in ("", "file") else "/tmp/x"
            cfg = parse_config({"sources": [{"path": "/tmp"}], "rules": [{"to": [url]}]})
            assert isinstance(cfg.rules[0].to[0], model), scheme
