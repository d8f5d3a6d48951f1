"""The command line: parse arguments, load the config, call the service (or a history command).

No dispatching logic lives here. Configuration errors exit with status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__
from .config import DEFAULT_IGNORE, Config, Step, folder_problem, load_config, real, watched_by
from .content import import_problems
from .errors import ConfigError, FileDispatchError
from .learn import Learned, learn_folders, learn_problems, learned_models
from .models import Status
from .router import Router, age_text, describe_target
from .textsafe import escape

if TYPE_CHECKING:
    from .journal import Database
    from .learn.model import Prediction
    from .service import Service
    from .simulate import Decision

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: the largest whole number the journal (SQLite) stores; a larger id or limit cannot be asked
MAX_INTEGER = 2**63 - 1


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_INTEGER:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_INTEGER}")
    return value


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:  # also refuses nan, which compares false
        raise argparse.ArgumentTypeError("must be 0 to 86400 seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 0-65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filedispatch",
        description="Watch folders and deliver each new file where its rules send it.",
        epilog="Commands: check, explain, learn-check, history, mark-existing, nodes "
        "(see 'filedispatch COMMAND -h'). "
        "Without a command, the service runs on the config given with -c.",
    )
    parser.add_argument(
        "-v",
        "--version",
        action="version",
        version=f"filedispatch {__version__}",
        help="display the version and exit",
    )
    parser.add_argument("-c", "--config", type=Path, help="configuration file to use")
    parser.add_argument("-H", "--host", metavar="IP", help="web app host ip (default: 127.0.0.1)")
    parser.add_argument("-P", "--port", type=_port, help="web app port (default: 3001)")
    parser.add_argument("--no-webapp", action="store_true", help="do not start the web app")
    parser.add_argument("--monitor-port", type=_port, help="console port (default: 50101)")
    parser.add_argument("--no-monitor", action="store_true", help="do not start the console")
    parser.add_argument("-d", "--daemon", action="store_true", help="run as a daemon")
    parser.add_argument(
        "-x", "--exit", action="store_true", help="stop the running daemon (needs only -p)"
    )
    parser.add_argument(
        "-p",
        "--pidfile",
        type=Path,
        help="PID file path (default: $XDG_RUNTIME_DIR/filedispatch.pid)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=90.0,
        metavar="S",
        help="with -x: how long to wait for in-flight deliveries (default: 90)",
    )
    parser.add_argument("--log-file", type=Path, help="write logs to this file")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default: INFO, or the root level of --log-config)",
    )
    parser.add_argument(
        "--log-config",
        type=Path,
        help="logging configuration file (YAML, logging.config.dictConfig)",
    )
    parser.add_argument(
        "--db",
        type=Path,
        help="journal database (default: database: in the "
        "config, else ~/.local/state/filedispatch/journal.db)",
    )
    parser.add_argument(
        "--move", action="store_true", help="remove each source file once every destination has it"
    )
    parser.add_argument(
        "--consume-marked",
        action="store_true",
        help="apply after: delete/move (and --move) to files mark-existing recorded, which "
        "no destination was sent (by default they are kept)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="dispatch what is there now, wait for it, print a summary, exit",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print where each file would go; write nothing"
    )
    parser.add_argument(
        "--max-items", type=_positive, metavar="N", help="dispatch at most N files in this run"
    )

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="validate a config and print its routing table")
    add_config_option(check, "configuration to check (also accepted before 'check')")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also open the journal as the service would (connect to PostgreSQL with the "
        "configured credentials) and say what it found; writes nothing",
    )
    explain = sub.add_parser("explain", help="say which rules take the given files, and why")
    add_config_option(explain, "configuration (also accepted before 'explain')")
    explain.add_argument("files", nargs="+", type=Path)
    learn_check = sub.add_parser(
        "learn-check",
        help="cross-validate the learned rules' models on their examples: accuracy per label "
        "and the confusion between labels",
    )
    add_config_option(learn_check, "configuration (also accepted before 'learn-check')")
    learn_check.add_argument(
        "--folds", type=_positive, default=5, metavar="K", help="cross-validation folds (5)"
    )
    add_history_commands(sub)
    add_nodes_command(sub)
    return parser


def add_nodes_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``nodes`` (list them) and ``nodes hand-over OLD [--to NEW]`` (see nodecmd.py)."""
    nodes = sub.add_parser(
        "nodes",
        help="list the nodes sharing the journal, or hand a dead node's work over to another",
        description="Without an ACTION: list the nodes on record (alive or since when dead, "
        "their work in flight, the work only they may run).",
        epilog="Exit status: 0 done; 1 the journal cannot be reached, the node is alive or "
        "unknown; 2 usage error.",
    )
    add_config_option(nodes, "configuration (also accepted before 'nodes')")
    nsub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    hand = nsub.add_parser(
        "hand-over",
        help="give the work only a dead node may run (its unshared sources' waiting rows) to "
        "another node, then forget it; refused while its lease holds",
    )
    hand.add_argument(
        "-c", "--config", type=Path, dest="hand_config", metavar="CONFIG", help="configuration"
    )
    hand.add_argument("old", metavar="OLD", help="the dead node's name (see 'nodes')")
    hand.add_argument(
        "--to", metavar="NEW", help="the node to give its work to (default: this config's node)"
    )


def add_config_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``-c/--config`` after a sub-command; ``main`` takes it from before the sub-command too
    (``filedispatch -c CONFIG check``)."""
    parser.add_argument("-c", "--config", type=Path, dest="sub_config", metavar="CONFIG", help=help)


def add_history_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``history list|show|retry|forget|stats`` and ``mark-existing`` (see history.py)."""
    journal = argparse.ArgumentParser(add_help=False)
    add_config_option(journal, "configuration (also accepted before the command)")
    journal.add_argument(
        "--db", type=Path, dest="sub_db", metavar="DB", help="journal (default: the config's)"
    )
    history = sub.add_parser(
        "history",
        help="list, show, retry, forget or count dispatches in the journal (safe while it runs)",
        epilog="Exit status: 0 done; 1 no such id, path or journal; 2 usage error.",
    )
    hsub = history.add_subparsers(dest="history_command", metavar="ACTION", required=True)
    hlist = hsub.add_parser("list", parents=[journal], help="the newest dispatches")
    hlist.add_argument("--status", type=str.upper, choices=[s.value for s in Status])
    hlist.add_argument("--limit", type=_positive, default=20, metavar="N", help="(default: 20)")
    hlist.add_argument("--json", action="store_true", help="print JSON")
    show = hsub.add_parser("show", parents=[journal], help="every field of one dispatch")
    show.add_argument("id", type=_positive, help="a dispatch id (see history list)")
    forget = hsub.add_parser(
        "forget", parents=[journal], help="delete history so the file is sent again"
    )
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=_positive, nargs="?", help="a dispatch id (see history list)")
    which.add_argument("--path", help="a file's path in its source (relative or absolute)")
    retry = hsub.add_parser(
        "retry",
        parents=[journal],
        help="send FAILED dispatches again (a file in failed_dir is moved back into its source)",
    )
    again = retry.add_mutually_exclusive_group(required=True)
    again.add_argument("id", type=int, nargs="?", help="a FAILED dispatch id (see history list)")
    again.add_argument("--path", help="a file's path in its source (relative or absolute)")
    again.add_argument("--failed", action="store_true", help="every FAILED dispatch")
    hstats = hsub.add_parser("stats", parents=[journal], help="counts per day, week or month")
    hstats.add_argument("--period", choices=["day", "week", "month"], default="day")
    hstats.add_argument("--json", action="store_true", help="print JSON")
    mark = sub.add_parser(
        "mark-existing",
        parents=[journal],
        help="record the files present now as already dispatched, without sending them",
    )
    mark.add_argument("--dry-run", action="store_true", dest="sub_dry_run", help="only print")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("check", "explain", "learn-check"):
            path = args.sub_config or args.config
            if path is None:
                parser.error(f"{args.command} needs -c CONFIG (before or after '{args.command}')")
            if args.command == "learn-check":
                return cmd_learn_check(path, args.folds)
            if args.command == "check":
                return cmd_check(path, args.connect)
            return cmd_explain(path, args.files)
        if args.command == "nodes":
            return cmd_nodes(parser, args)
        if args.command in ("history", "mark-existing"):
            from .history import run_command

            path = args.sub_config or args.config
            load = load_checked if args.command == "mark-existing" else load_config  # hooks route
            return run_command(args, load(path) if path else None)
        if args.exit:
            from .daemon import stop_daemon

            return stop_daemon(args.pidfile, args.stop_timeout)
        if args.config is None:
            parser.error("the following arguments are required: -c/--config")
        return cmd_run(args)
    except ConfigError as exc:
        for problem in exc.problems:  # one line each, naming the file and the field
            say(f"filedispatch: invalid configuration {exc.source}: {problem}", sys.stderr)
        return EXIT_USAGE
    except FileDispatchError as exc:  # JournalError, ServiceError ...
        say(f"filedispatch: {exc}", sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def say(line: str, file: TextIO | None = None) -> None:
    """Print one line; what a file's writer or the config named cannot break it (``escape``)."""
    print(escape(line), file=file or sys.stdout)


def load_checked(path: Path) -> Config:
    """Load a config and also import every Python hook it names (so typos fail now), and
    check the learned rules' extra and examples."""
    config = load_config(path)
    problems = import_problems(config) + learn_problems(config)
    if problems:
        raise ConfigError(str(path), problems)
    return config


# ---------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .config import secrets_of
    from .service import Options, Service

    config = load_checked(args.config)
    if args.dry_run:
        return dry_run(config, args.max_items, args.db)
    check_options(config, args)
    options = Options(
        config_path=args.config.absolute(),
        db=args.db,
        once=args.once,
        max_items=args.max_items,
        move=args.move,
        consume_marked=args.consume_marked,
        api_host=args.host,
        api_port=args.port,
        webapp=False if args.no_webapp or args.once else None,
        monitor_port=args.monitor_port,
        monitor=False if args.no_monitor or args.once else None,
    )
    if args.daemon:
        from .daemon import run_daemon

        return run_daemon(config, options, args)
    try:
        logs.setup(args.log_level, args.log_file if args.log_file else None, args.log_config)
    except OSError as exc:  # checked above; this is a race with someone changing the folder
        problem = f"--log-file: cannot be opened: {exc.strerror or exc}"
        raise ConfigError(str(args.config), [problem]) from None
    logs.set_secrets(secrets_of(config))
    service = Service(config, options)
    code = asyncio.run(service.run())
    if args.once:
        print_summary(service)
    return code


def check_options(config: Config, args: argparse.Namespace) -> None:
    """Files named on the command line: usable, and not inside a watched source.

    Raises ConfigError (exit 2) naming the option; the same rules as for ``database:``.
    """
    problems = []
    for option, path in (("--db", args.db), ("--log-file", args.log_file)):
        if path is None:
            continue
        if "\0" in str(path) or not str(path).strip():
            problems.append(f"{option}: not a usable path")
            continue
        path = path.expanduser().absolute()
        if path.is_dir():
            problems.append(f"{option}: {path} is a folder; give a file name")
        elif (problem := folder_problem(path.parent)) is not None:
            problems.append(f"{option}: {problem}")
        for i, source in enumerate(config.sources):
            if watched_by(source, path):
                problems.append(
                    f"{option}: {path} is inside the watched source sources[{i}] "
                    f"({real(source.path)}); it would be dispatched"
                )
    if problems:
        raise ConfigError(str(args.config), problems)


def print_summary(service: Service) -> None:
    """The ``--once`` summary: what was done, then what the sources' scans passed over, per
    reason (``skipped: hidden: 2  ignored: 0  unmatched: 1 ...``; see watcher.SKIP_REASONS)."""
    s = service.summary
    say(
        f"processed: {s.processed}  already done: {s.already_done}  failed: {s.failed}"
        + (f"  left for later (--max-items): {s.skipped}" if s.skipped else "")
        + (
            f"  not moved (a done_dir or failed_dir hangs, or a move failed: see the log): "
            f"{s.unmoved}"
            if s.unmoved
            else ""
        )
    )
    from .watcher import total_skips

    skips = total_skips(service.watchers)
    say("skipped: " + "  ".join(f"{reason}: {n}" for reason, n in skips.items()))


def dry_run(config: Config, max_items: int | None, db: Path | None = None) -> int:
    """Print what a start would do with each file in the sources, and why a file is not
    taken; open nothing for writing (the journal is only read, a learned model is not
    cached). ``max_items`` counts only files that would be sent, as the run does."""
    from .journal import journal_path

    database = journal_path(config, db)
    with learned_models(config, store=False, database=database) as learned:
        return _dry_run(config, max_items, database, learned)


def _dry_run(
    config: Config, max_items: int | None, database: Database, learned: Learned | None
) -> int:
    from .simulate import Simulation

    simulation = Simulation(config, database, learned=learned)
    count = 0
    for decision in simulation.scan():
        if not decision.taken:
            say(f"{decision.shown}: not taken: {decision.why_not}")
            continue
        if max_items is not None and count >= max_items:
            say(f"(stopping at --max-items {max_items}: only files to send are counted)")
            return EXIT_OK
        count += 1  # a duplicate too: the run records it (as --max-items counts it)
        assert decision.version is not None
        for chain in decision.chains:
            for step, key in zip(chain.steps, chain.keys, strict=True):
                target = describe_target(step, decision.version, chain.label)
                dup = decision.duplicates.get(key)
                say(f"{decision.shown} -> [{chain.rule}] {target}" + (f" ({dup})" if dup else ""))
    return EXIT_OK


async def _never(*_: object) -> None:
    return None


# ---------------------------------------------------------------------------- check, explain


def cmd_nodes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``nodes`` and ``nodes hand-over`` (see nodecmd.py)."""
    from . import nodecmd

    path = getattr(args, "hand_config", None) or args.sub_config or args.config
    if path is None:
        parser.error("nodes needs -c CONFIG (before or after 'nodes')")
    config = load_config(path)
    if args.nodes_command == "hand-over":
        return nodecmd.hand_over(config, str(path), args.old, args.to)
    return nodecmd.list_nodes(config)


def cmd_check(path: Path, connect: bool = False) -> int:
    """Validate the config and print its routing table; with ``connect``, also open the
    journal as the service would (``nodecmd.connect_report``)."""
    config = load_checked(path)
    from .journal import journal_path
    from .watcher import describe_writer_check

    missing = file_problems(config)
    # "valid" above errors would contradict them: the verdict comes first, and is the same
    say(f"{path}: valid" if not missing else f"{path}: {len(missing)} problem(s), listed below")
    say(f"journal: {journal_path(config)}")
    say("sources:")
    for s in config.sources:
        ready = f"ready: {s.ready}" + (f" (settle {s.settle:g}s)" if s.ready == "settle" else "")
        after = s.after + (f" -> {s.done_dir}" if s.after == "move" else "")
        say(
            f"  {s.key}: {s.path}{' (recursive)' if s.recursive else ''}; {ready}; "
            f"after: {after}" + (f"; failed_dir: {s.failed_dir}" if s.failed_dir else "")
        )
        own = ", ".join(s.ignore_globs[len(DEFAULT_IGNORE) if s.ignore_defaults else 0 :])
        base = "the defaults (.*, *.part, ...)" if s.ignore_defaults else ""
        say(f"    ignore: {' and '.join(t for t in (base, own) if t) or 'nothing'}")
        if not s.path.exists():
            say(f"    note: {s.path} does not exist yet; the service creates it at start")
        if s.open_writers == "check":
            say(f"    open writers: {describe_writer_check(s.path)}")
        else:
            say("    open writers: not checked (open_writers: ignore)")
    say("rules (in order; the first match wins unless a rule says continue):")
    router = Router(config)
    for i, rule in enumerate(router.rules, 1):
        cfg = rule.config
        what = []
        if cfg.extensions:
            what.append("extensions " + ",".join(cfg.extensions))
        if cfg.glob:
            what.append("glob " + ",".join(cfg.glob))
        if cfg.regex:
            what.append(f"regex {cfg.regex}")
        if cfg.mime:
            what.append("mime " + ",".join(cfg.mime))
        if cfg.exclude:
            what.append("exclude " + ",".join(cfg.exclude))
        if cfg.min_size is not None:
            what.append(f">= {cfg.min_size} bytes")
        if cfg.max_size is not None:
            what.append(f"<= {cfg.max_size} bytes")
        if cfg.min_age is not None or cfg.max_age is not None:
            low = age_text(cfg.min_age) if cfg.min_age is not None else "0s"
            high = age_text(cfg.max_age) if cfg.max_age is not None else ""
            what.append(f"age {low}..{high}")
        if cfg.learned:
            learn = cfg.learned
            what.append(f"learned from {learn.learn} (min_confidence {learn.min_confidence:g})")
        elif cfg.classify:
            what.append(f"classify {cfg.classify}")
        srcs = ",".join(cfg.sources) if cfg.sources else "all sources"
        flag = " (continue)" if cfg.continue_ else ""
        say(f"  {i}. {rule.name}{flag}: {'; '.join(what) or 'every file'} from {srcs}")
        for j, step in enumerate(cfg.to, 1):
            name = getattr(step, "name", None)
            extra = f" name {name}" if name else ""
            if zone := getattr(step, "timezone", None):
                extra += f" (times in {zone})"
            extra += describe_controls(step)
            say(f"       {j}) {step.kind}: {step.display}{extra}")
    from .notify import describe

    for line in describe(config):
        say(f"  notify {line}")
    problems = missing + verify_problems(config)
    for problem in problems:
        say(f"{path}: {problem}", sys.stderr)
    if problems:
        return EXIT_USAGE
    if connect:
        from .nodecmd import connect_report

        return connect_report(config)
    return EXIT_OK


def describe_controls(step: Step) -> str:
    """``; dedupe content; rate 10/s; ...`` for the routing table (empty without controls)."""
    parts = ["dedupe content"] if step.deduped else []
    parts += [
        f"{key} {value}" for key in ("rate", "bandwidth", "window") if (value := getattr(step, key))
    ]
    return "".join(f"; {p}" for p in parts)


def file_problems(config: Config) -> list[str]:
    """TLS and SSH files the steps name (``ca_file``, ``key_file``, ``known_hosts``) that are
    missing or unreadable: the first real delivery would fail on them. Names the rule, the
    step and the field; never shows the file's content."""
    problems = []
    for i, rule in enumerate(config.rules):
        for j, step in enumerate(rule.to):
            for field in ("ca_file", "key_file", "known_hosts"):
                path = getattr(step, field, None)
                if path is None:
                    continue
                where = f"rules[{i}].to[{j}].{field}"
                if not path.exists():
                    problems.append(f"{where}: {path} does not exist")
                elif not path.is_file():
                    problems.append(f"{where}: {path} is not a file")
                elif not os.access(path, os.R_OK):
                    problems.append(f"{where}: {path} cannot be read by this user")
    return problems


def verify_problems(config: Config) -> list[str]:
    """FTP destinations with ``verify: sha256`` whose server cannot hash (asked over FTP)."""
    from .config import FtpDestination
    from .processors.ftp import sha256_problem

    steps = {
        s.display: s
        for r in config.rules
        for s in r.to
        if isinstance(s, FtpDestination) and s.verify == "sha256"
    }

    async def ask() -> list[str | None]:
        return list(await asyncio.gather(*(sha256_problem(s) for s in steps.values())))

    return [p for p in asyncio.run(ask()) if p] if steps else []


def cmd_explain(path: Path, files: list[Path]) -> int:
    """Say for each file what the service would do with it now, and why (see simulate.py)."""
    from .journal import journal_path
    from .simulate import Simulation

    config = load_checked(path)
    with learned_models(config, where=str(path)) as learned:
        simulation = Simulation(config, journal_path(config), learned=learned)
        folders = {name: rule.learn for name, rule in simulation.router.learners.items()}
        for file in files:
            d = simulation.look(file)
            if d.version is None:
                say(f"{file}: not taken: {d.why_not}")
                other = simulation.look_outside(file) if d.source is None else None
                if other is not None and other.version is not None:
                    # a sample file for a learned rule: its rules, read where it is
                    say(
                        f"  as if in source {other.version.source} (read where it is): "
                        f"path {other.version.relpath}, {other.version.size} bytes"
                    )
                    _show_rules(other, learned, folders)
                continue
            v = d.version
            say(f"{file}: source {v.source}, path {v.relpath}, {v.size} bytes")
            if d.facts.mime:
                say(f"  detected type: {d.facts.mime}")
            _show_rules(d, learned, folders)
            if d.sends_nothing:
                say(f"  => recorded, not sent: {next(iter(d.duplicates.values()))}")
            else:
                say(f"  => {'would be sent' if d.taken else f'not taken: {d.why_not}'}")
    return EXIT_OK


def _show_rules(d: Decision, learned: Learned | None, folders: dict[str, Path]) -> None:
    """Each rule's verdict (with how a learned rule, whose examples are in ``folders`` by rule
    name, read the file) and the targets."""
    from .controls import window_state

    assert d.version is not None
    for check in d.checks:
        mark = "+" if check.matched else "-"
        say(f"  {mark} {check.rule}: {check.why}")
        answer = d.facts.learned.get(check.rule)
        if answer is not None and learned is not None and check.rule in folders:
            explain_prediction(learned, folders[check.rule], answer)
    shut = window_state(step for chain in d.chains for step in chain.steps)
    for chain in d.chains:
        for step, key in zip(chain.steps, chain.keys, strict=True):
            say(f"    -> {describe_target(step, d.version, chain.label)}")
            if dup := d.duplicates.get(key):
                say(f"       ({dup})")
            for w in shut:
                if w.destination == step.display and w.opens is not None:
                    opens = time.strftime("%Y-%m-%d %H:%M", time.localtime(w.opens))
                    say(f"       (its window {w.window} is shut: waits until {opens})")


def explain_prediction(learned: Learned, folder: Path, answer: Prediction) -> None:
    """Each label's probability and the words of the file that weighed most for it."""
    document = answer.document
    if document.method == "name":
        say(f"      read: the file name only ({document.note})")
    else:
        kind = "" if document.method == "text" else f"{document.method.upper()} "
        say(f"      read: its {kind}text")
    model = learned.model(folder)
    for label, probability in answer.probabilities:
        words = model.top_words(document, label) if model is not None else []
        shown = ", ".join(words) if words else "(no word for it)"
        say(f"      {probability:6.1%}  {label}: {shown}")


# ---------------------------------------------------------------------------- learn-check


def cmd_learn_check(path: Path, folds: int) -> int:
    """Cross-validated accuracy per label and the confusion, for each learned rule."""
    from .learn.extract import Extractor
    from .learn.model import cross_check, find_examples

    config = load_checked(path)
    folders = learn_folders(config)
    if not folders:
        say(f"{path}: no rule has classify: {{learn: FOLDER}}", sys.stderr)
        return EXIT_USAGE
    with Extractor() as extractor:
        for where, folder in folders.items():
            examples = find_examples(folder)
            result = cross_check(extractor, examples, folds)
            total = sum(len(f) for f in examples.values())
            say(f"{where}: {folder}: {total} examples, {result.folds}-fold cross-validation")
            # escaped before they are padded, so a label with a control character lines up
            shown = {label: escape(label) for label in result.labels}
            width = max(len(name) for name in shown.values())
            for label in result.labels:
                accuracy = result.accuracy[label]
                count = len(examples[label])
                say(f"  {shown[label]:<{width}}  {accuracy:6.1%}  ({count} examples)")
            say(f"  {'overall':<{width}}  {result.overall:6.1%}")
            say("  confusion (rows: the examples' label; columns: the label predicted):")
            say("  " + " " * width + "".join(f"  {shown[lb][:10]:>10}" for lb in result.labels))
            for label, row in zip(result.labels, result.confusion, strict=True):
                say(f"  {shown[label]:<{width}}" + "".join(f"  {n:>10}" for n in row))
    return EXIT_OK
