"""Configuration: the pydantic v2 models, the seed format mapped onto them, and load_config().

Config is read once; every part receives its typed slice. Nothing here touches the network,
and no secret (password, token) ever appears in an error message or in ``repr``.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .naming import check_template
from .shell import compile_command

#: names that are never taken: hidden files and the usual partial-download suffixes
DEFAULT_IGNORE: tuple[str, ...] = (
    ".*",
    "*.part",
    "*.partial",
    "*.tmp",
    "*.crdownload",
    "*.download",
    "*.swp",
    "*~",
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_size(value: int | str) -> int:
    """``10KB`` -> 10240: sizes take K, M, G, T (powers of 1024), with or without ``B``/``iB``."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as 10KB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 512, 10KB, 2GB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


Size = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class RetryPolicy(_Model):
    """How often, and how far apart, a failing step is tried again."""

    attempts: int = Field(5, ge=1, le=1000)  #: total tries, the first included
    delay: float = Field(1.0, ge=0)  #: seconds before the first retry
    backoff: float = Field(2.0, ge=1)  #: each further wait is multiplied by this
    max_delay: float = Field(300.0, ge=0)  #: a cap on one wait
    jitter: bool = True  #: spread waits by up to +/-20% so retries do not march in step
    #: Rattail's rule: retry only while the same kind of error repeats
    same_error: bool = False

    def wait(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th try failed (1-based), before jitter."""
        return float(min(self.max_delay, self.delay * self.backoff ** max(0, attempt - 1)))


# --------------------------------------------------------------------------- steps


class _Step(_Model):
    retry: RetryPolicy = RetryPolicy()
    concurrency: int | None = Field(None, ge=1, le=1024)  #: at most this many at once
    timeout: float | None = Field(None, gt=0)  #: seconds one attempt may take


OnConflict = Literal["rename", "overwrite", "skip", "fail"]


class _UrlStep(_Step):
    """Common to destinations given by URL: a naming template and a conflict policy."""

    url: str
    #: naming template for the delivered file, relative to the destination folder
    name: str = "{relpath}"
    on_conflict: OnConflict = "rename"

    @cached_property
    def parts(self) -> Any:
        return urlsplit(self.url)

    def __repr_args__(self) -> Any:  # a repr (in a log or traceback) never shows a password
        for key, value in super().__repr_args__():
            yield key, (redact_url(value) if key == "url" and isinstance(value, str) else value)

    @cached_property
    def display(self) -> str:
        """The URL with any password replaced by ``***``."""
        return redact_url(self.url)

    def identity(self) -> str:
        return f"{self.kind}:{self.display}:{self.name}"

    kind: str = ""

    @field_validator("name")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)


class LocalDestination(_UrlStep):
    """A folder on this machine: ``/path``, ``./path``, ``~/path`` or ``file:///path``."""

    kind: Literal["file"] = "file"
    mode: Literal["copy", "move"] = "copy"
    #: permission bits of delivered files (octal string or number); None keeps the umask's
    file_mode: int | None = Field(None, ge=0, le=0o7777)
    fsync: bool = True  #: flush data to disk before the rename makes the file visible

    @cached_property
    def folder(self) -> Path:
        url = self.url
        if url.startswith("file://"):
            url = unquote(urlsplit(url).path)
        return Path(os.path.expanduser(url)).absolute()

    @cached_property
    def display(self) -> str:
        return str(self.folder)

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"{value!r} is not an octal mode such as '0644'") from None
        return value


class Expect(_Model):
    """What a successful HTTP answer looks like beyond its status."""

    status: list[int] = Field(default_factory=lambda: list(range(200, 300)))
    contains: str | None = None  #: the body must contain this text
    json_field: str | None = None  #: the JSON body must have this (dotted) field, truthy
    json_value: Any = None  #: ... and, if set, equal to this


class HttpTimeout(_Model):
    connect: float = Field(30.0, gt=0)
    read: float = Field(300.0, gt=0)  #: the longest silence while sending or reading
    total: float | None = Field(None, gt=0)  #: none by default: large files take long


class HttpDestination(_UrlStep):
    """An HTTP(S) endpoint; the file is streamed from disk as a raw body or multipart form."""

    kind: Literal["http"] = "http"
    name: str = "{name}"
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    fieldname: str | None = None  #: multipart/form-data with the file in this field
    fields: dict[str, str] = Field(default_factory=dict)  #: extra multipart form fields
    chunked: bool = False  #: chunked transfer instead of Content-Length
    headers: dict[str, str] = Field(default_factory=dict)
    token: SecretStr | None = None  #: sent as ``Authorization: Bearer ...``
    http_timeout: HttpTimeout = HttpTimeout()
    verify: bool = True
    ca_file: Path | None = None
    expect: Expect = Expect()
    chunk_size: int = Field(1024 * 1024, ge=1024)  #: bytes read and sent at a time

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = _remote_url(value, ("http", "https"))
        if "{" in parts.path:  # e.g. PUT https://host/dav/{yyyy}/{name}
            check_template(unquote(parts.path))
        return value

    @model_validator(mode="after")
    def _one_authorization(self) -> HttpDestination:
        sources = [self.parts.password is not None or bool(self.parts.username)]
        sources += [self.token is not None]
        sources += [any(k.lower() == "authorization" for k in self.headers)]
        if sum(sources) > 1:
            raise ValueError(
                "give one of: user:password in the URL, token, or an Authorization header"
            )
        return self


class FtpDestination(_UrlStep):
    """An FTP server (``ftp://``) or FTP with explicit TLS (``ftps://``)."""

    kind: Literal["ftp"] = "ftp"
    password: SecretStr | None = None  #: instead of the password in the URL
    passive: bool = True
    connect_timeout: float = Field(30.0, gt=0)
    socket_timeout: float = Field(60.0, gt=0)
    pool_size: int = Field(4, ge=1, le=32)  #: connections kept open to this server
    verify: bool = True
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _ftp_url(cls, value: str) -> str:
        _remote_url(value, ("ftp", "ftps"))
        return value

    @field_validator("passive")
    @classmethod
    def _passive_only(cls, value: bool) -> bool:
        if not value:
            raise ValueError("active mode is not supported (aioftp connects passively)")
        return value

    @model_validator(mode="after")
    def _one_password(self) -> FtpDestination:
        _check_one_password(self)
        return self


class SftpDestination(_UrlStep):
    """An SSH server reached with SFTP: ``sftp://user@host:port/dir``."""

    kind: Literal["sftp"] = "sftp"
    password: SecretStr | None = None
    key_file: Path | None = None
    passphrase: SecretStr | None = None
    #: a known_hosts file; None uses ~/.ssh/known_hosts
    known_hosts: Path | None = None
    #: turns host key checking off; must be said explicitly and is logged as a warning
    insecure_skip_host_key_check: bool = False
    connect_timeout: float = Field(30.0, gt=0)
    pool_size: int = Field(2, ge=1, le=32)

    @field_validator("url")
    @classmethod
    def _sftp_url(cls, value: str) -> str:
        _remote_url(value, ("sftp",))
        return value

    @model_validator(mode="after")
    def _one_password(self) -> SftpDestination:
        _check_one_password(self)
        return self


def _remote_url(value: str, schemes: tuple[str, ...]) -> Any:
    """Check a destination URL's scheme, host and port; the message never shows a password."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{redact_url(value)!r} is not a valid URL (bad port?)") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"the URL must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError(f"{redact_url(value)!r} has no host")
    return parts


def _check_one_password(step: FtpDestination | SftpDestination) -> None:
    if step.password is not None and step.parts.password is not None:
        raise ValueError("give the password in the URL or as password:, not both")


class CommandStep(_Step):
    """A shell command run on the file; placeholders become quoted variables (see shell.py)."""

    kind: Literal["command"] = "command"
    command: str
    env: dict[str, str] = Field(default_factory=dict)
    #: the command's working folder; None: the chain's private work folder
    cwd: Path | None = None

    @property
    def display(self) -> str:
        return f"command: {self.command}"

    def identity(self) -> str:
        return f"command:{self.command}:{self.cwd}:{sorted(self.env.items())!r}"

    @field_validator("command")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        compile_command(value)  # raises ValueError naming an unknown placeholder
        return value


class PythonStep(_Step):
    """A Python callable ``package.module:function`` or ``package.module:Class``."""

    kind: Literal["python"] = "python"
    python: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def display(self) -> str:
        return f"python: {self.python}"

    def identity(self) -> str:
        return f"python:{self.python}:{self.args!r}:{sorted(self.kwargs.items())!r}"

    @field_validator("python")
    @classmethod
    def _spec(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError("must look like 'package.module:function'")
        return value

    @field_validator("kwargs")
    @classmethod
    def _no_context(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "context" in value:
            raise ValueError("'context' is reserved: callables that declare it receive the step")
        return value


class CompressStep(_Step):
    """A transform: the later steps of the chain deliver the compressed file instead."""

    kind: Literal["compress"] = "compress"
    compress: Literal["gzip", "zip", "tar.gz", "zstd"]
    level: int | None = Field(None, ge=0, le=22)

    @property
    def display(self) -> str:
        return f"compress: {self.compress}"

    def identity(self) -> str:
        return f"compress:{self.compress}:{self.level}"

    @model_validator(mode="after")
    def _level_range(self) -> CompressStep:
        if self.level is not None and self.compress != "zstd" and self.level > 9:
            raise ValueError(f"level: {self.compress} takes 0 to 9 (zstd takes up to 22)")
        return self


_SCHEME_KIND = {
    "": "file",
    "file": "file",
    "http": "http",
    "https": "http",
    "ftp": "ftp",
    "ftps": "ftp",
    "sftp": "sftp",
}


def _step_kind(value: Any) -> str | None:
    if isinstance(value, str):
        value = {"url": value}
    if isinstance(value, BaseModel):
        return str(getattr(value, "kind", None))
    if not isinstance(value, Mapping):
        return None
    for key in ("command", "python", "compress"):
        if key in value:
            return key
    url = value.get("url")
    if not isinstance(url, str):
        return None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return _SCHEME_KIND.get(scheme)


def _coerce_step(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


Step = Annotated[
    Annotated[LocalDestination, Tag("file")]
    | Annotated[HttpDestination, Tag("http")]
    | Annotated[FtpDestination, Tag("ftp")]
    | Annotated[SftpDestination, Tag("sftp")]
    | Annotated[CommandStep, Tag("command")]
    | Annotated[PythonStep, Tag("python")]
    | Annotated[CompressStep, Tag("compress")],
    Discriminator(
        _step_kind,
        custom_error_type="destination",
        custom_error_message=(
            "not a destination: give a path, a URL (file, http, https, ftp, ftps, sftp) "
            "or a mapping with url, command, python or compress"
        ),
    ),
]
STEP_TAGS = frozenset({"file", "http", "ftp", "sftp", "command", "python", "compress"})

# --------------------------------------------------------------------------- sources and rules

Ready = Literal["settle", "lock", "done"]
After = Literal["keep", "delete", "move"]
OpenWriters = Literal["check", "ignore"]


class SourceConfig(_Model):
    """A folder to watch and what to do with its files once delivered."""

    path: Path
    name: str | None = None  #: how rules and the journal refer to it; defaults to the path
    recursive: bool = False
    process_existing: bool = True
    settle: float = Field(1.0, ge=0)
    ready: Ready = "settle"
    ignore: list[str] = Field(default_factory=list)  #: globs, added to the defaults
    ignore_defaults: bool = True
    after: After = "keep"
    done_dir: Path | None = None
    failed_dir: Path | None = None
    follow_symlinks: bool = False  #: links followed only where they stay inside the source
    #: ``check``: a file someone still holds open for writing is not complete (a lease, or
    #: /proc where no lease can be had); ``ignore``: only ``ready`` decides
    open_writers: OpenWriters = "check"
    poll: bool | None = None  #: None: poll only on network filesystems
    poll_interval: float = Field(1.0, gt=0)
    rescan: float = Field(60.0, ge=0)  #: seconds between reconcile scans; 0 turns them off
    stop_on_error: bool = False  #: Rattail: a failure stops dispatching from this source

    @property
    def key(self) -> str:
        return self.name or str(self.path)

    @property
    def ignore_globs(self) -> tuple[str, ...]:
        return (DEFAULT_IGNORE if self.ignore_defaults else ()) + tuple(self.ignore)

    @model_validator(mode="after")
    def _after_needs_done_dir(self) -> SourceConfig:
        if self.after == "move" and self.done_dir is None:
            raise ValueError("after: move needs done_dir")
        return self


class RuleConfig(_Model):
    """Which files go where; rules are tried in order."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    sources: list[str] = Field(default_factory=list)  #: empty: every source
    extensions: list[str] = Field(default_factory=list)
    glob: list[str] = Field(default_factory=list)
    regex: str | None = None
    exclude: list[str] = Field(default_factory=list)
    min_size: Size | None = None
    max_size: Size | None = None
    mime: list[str] = Field(default_factory=list)  #: e.g. image/*, application/pdf
    classify: str | None = None  #: ``module:function`` naming the rule a file belongs to
    continue_: bool = Field(False, alias="continue")
    to: list[Step] = Field(min_length=1)

    @field_validator("extensions", "glob", "exclude", "mime", "sources", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("extensions")
    @classmethod
    def _ext(cls, value: list[str]) -> list[str]:
        return [e.lower().lstrip(".") for e in value]

    @field_validator("min_size", "max_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return None if value is None else parse_size(value)  # type: ignore[arg-type]

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, value: object) -> object:
        if isinstance(value, (str, Mapping)):
            value = [value]
        return [_coerce_step(v) for v in value] if isinstance(value, list) else value


class ApiConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(3001, ge=0, le=65535)
    token: SecretStr | None = None
    #: an environment variable holding the token (read at start)
    token_env: str | None = "FILEDISPATCH_API_TOKEN"


class MonitorConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(50101, ge=0, le=65535)
    console: bool = False  #: aiomonitor's Python REPL; off unless asked for
    console_port: int = Field(50102, ge=0, le=65535)
    allow_remote: bool = False  #: needed to listen beyond loopback


class Config(_Model):
    """The whole configuration, as validated from YAML."""

    database: Path | None = None
    workdir: Path | None = None  #: where transforms write intermediate files
    workers: int = Field(16, ge=1, le=1024)  #: deliveries in flight at once, all destinations
    shutdown_grace: float = Field(30.0, ge=0)  #: seconds in-flight work may take at shutdown
    sources: list[SourceConfig] = Field(min_length=1)
    rules: list[RuleConfig] = Field(min_length=1)
    api: ApiConfig = ApiConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems: list[str] = []
        keys = [s.key for s in self.sources]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            problems.append(f"sources: the name {sorted(dupes)[0]!r} is used twice")
        names = [r.name for r in self.rules if r.name]
        if len(names) != len(set(names)):
            problems.append("rules: two rules have the same name")
        known = set(keys) | {str(s.path) for s in self.sources}
        for i, rule in enumerate(self.rules):
            for s in rule.sources:
                if s not in known:
                    problems.append(f"rules[{i}].sources: no source is named {s!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def rule_name(self, index: int) -> str:
        return self.rules[index].name or f"rule-{index + 1}"

    def iter_local_roots(self) -> Iterator[tuple[str, Path]]:
        for i, rule in enumerate(self.rules):
            for j, step in enumerate(rule.to):
                if isinstance(step, LocalDestination):
                    yield f"rules[{i}].to[{j}]", step.folder


# --------------------------------------------------------------------------- secrets


def redact_url(url: str) -> str:
    """``ftp://user:secret@host/x`` -> ``ftp://user:***@host/x``; other text is unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None or not parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def secrets_of(config: Config) -> list[str]:
    """Every secret string in the config, for scrubbing free text such as error messages."""
    found: list[str] = []
    for rule in config.rules:
        for step in rule.to:
            for attr in ("password", "token", "passphrase"):
                secret = getattr(step, attr, None)
                if isinstance(secret, SecretStr) and secret.get_secret_value():
                    found.append(secret.get_secret_value())
            url = getattr(step, "url", None)
            if isinstance(url, str):
                try:
                    user, password = urlsplit(url).username, urlsplit(url).password
                except ValueError:
                    user, password = None, None
                if password:  # as written, decoded (what is sent) and encoded
                    found += [password, unquote(password), quote(password, safe="")]
                    # an HTTP server may echo the Basic Authorization header back
                    basic = f"{unquote(user or '')}:{unquote(password)}".encode()
                    found.append(base64.b64encode(basic).decode())
            for key, value in getattr(step, "headers", {}).items():
                if key.lower() in ("authorization", "proxy-authorization", "x-api-key", "cookie"):
                    found.append(value)
    if config.api.token is not None:
        found.append(config.api.token.get_secret_value())
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


# --------------------------------------------------------------------------- loading


def _substitute_env(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name, default)
            if value is None:
                problems.append(f"{path or '<top>'}: environment variable {name} is not set")
                return ""
            return value

        return _ENV_RE.sub(repl, node)
    if isinstance(node, list):
        return [_substitute_env(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {
            k: _substitute_env(v, f"{path}.{k}" if path else str(k), problems)
            for k, v in node.items()
        }
    return node


def _from_seed_format(raw: dict[str, Any]) -> dict[str, Any]:
    """Map the original ``source`` + ``folders`` format onto ``sources`` + ``rules``."""
    raw = dict(raw)
    source = raw.pop("source", None)
    folders = raw.pop("folders", None)
    if source is not None:
        raw.setdefault("sources", []).insert(0, {"path": source})
    if folders is not None:
        rules = raw.setdefault("rules", [])
        if not isinstance(folders, list):
            return {**raw, "rules": folders}
        for i, folder in enumerate(folders):
            if not isinstance(folder, dict):
                rules.append(folder)
                continue
            folder = dict(folder)
            dest: dict[str, Any] = {"url": folder.pop("path", None)}
            if "fieldname" in folder:
                dest["fieldname"] = folder.pop("fieldname")
            rules.append({"name": folder.pop("name", f"folder-{i + 1}"), **folder, "to": [dest]})
    return raw


def _loc(loc: tuple[int | str, ...]) -> str:
    out, previous = "", None
    for part in loc:
        after_index, previous = isinstance(previous, int), part
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in STEP_TAGS and after_index) or part.startswith("function-"):
            continue  # a union's tag, not a field (``command`` is both)
        else:
            out += f".{part}" if out else part
    return out or "<top>"


def _describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check its spelling)"
    elif err["type"] == "missing":
        msg = "is required"
    return msg.removeprefix("Value error, ")


def _check_paths(config: Config) -> list[str]:
    problems = []
    for i, src in enumerate(config.sources):
        root = src.path
        for loc, folder in config.iter_local_roots():
            if folder == root or (src.recursive and root in folder.parents):
                problems.append(
                    f"{loc}.url: the destination {folder} is inside the watched source "
                    f"sources[{i}] ({root}); files would be dispatched in a loop"
                )
        if src.after == "move" and src.done_dir == root:
            problems.append(f"sources[{i}].done_dir: must not be the source folder itself")
        if src.failed_dir is not None and src.failed_dir == root:
            problems.append(f"sources[{i}].failed_dir: must not be the source folder itself")
        for key in ("database", "workdir"):
            path = getattr(config, key)
            if path is not None and watched_by(src, path):
                problems.append(
                    f"{key}: {path} is inside the watched source sources[{i}] ({root}); "
                    "its own files would be dispatched"
                )
    return problems


def watched_by(source: SourceConfig, path: Path) -> bool:
    """Whether a file at ``path`` would be seen by the watcher of ``source``."""
    folder = path.parent
    return folder == source.path or (source.recursive and source.path in folder.parents)


def _absolutize(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are taken relative to the config file's folder."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            return str(base / os.path.expanduser(value))
        return value

    for key in ("database", "workdir"):
        if key in raw:
            raw[key] = fix(raw[key])
    for src in raw.get("sources") or []:
        if isinstance(src, dict):
            for key in ("path", "done_dir", "failed_dir"):
                if key in src:
                    src[key] = fix(src[key])
    for rule in raw.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        to = rule.get("to")
        steps = to if isinstance(to, list) else [to]
        fixed = []
        for step in steps:
            if isinstance(step, str):
                step = fix(step) if not step.startswith("~") else os.path.expanduser(step)
            elif isinstance(step, dict) and isinstance(step.get("url"), str):
                url = step["url"]
                step = {**step, "url": fix(url) if not url.startswith("~") else url}
            if isinstance(step, dict) and isinstance(step.get("cwd"), str):  # command steps
                step = {**step, "cwd": fix(os.path.expanduser(step["cwd"]))}
            fixed.append(step)
        if to is not None:
            rule["to"] = fixed


def parse_config(raw: Any, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must hold a mapping (keys such as sources, rules)"])
    problems: list[str] = []
    raw = _substitute_env(raw, "", problems)
    if problems:
        raise ConfigError(source, problems)
    raw = _from_seed_format(raw)
    base = base or Path.cwd()
    _absolutize(raw, base)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            source, [f"{_loc(e['loc'])}: {_describe(e)}" for e in exc.errors(include_input=False)]
        ) from None
    problems = _check_paths(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; relative paths inside it are relative to it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(str(path), [f"{where}{problem}"]) from None
    return parse_config(raw, str(path), path.absolute().parent)
