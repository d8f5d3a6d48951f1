"""Configuration: the pydantic v2 models, the seed format mapped onto them, and load_config().

Config is read once; every part receives its typed slice. Nothing here touches the network,
and no secret (password, token) ever appears in an error message or in ``repr``.
"""

from __future__ import annotations

import base64
import errno
import importlib.util
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias
from urllib.parse import quote, unquote, unquote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .journal.target import PostgresTarget, is_postgres, url_problem
from .naming import NameOptions, check_template
from .quantities import MAX_SIZE, Window, parse_bandwidth, parse_rate, parse_size
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

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: a variable a shell command names, ``${VAR}`` or ``$VAR`` (the shell expands both)
_SHELL_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
#: the largest age a rule can compare with, in seconds (about 100 years)
MAX_AGE = 100 * 365 * 86400.0


def zone_info(name: str) -> ZoneInfo:
    """An IANA time zone (``UTC``, ``Europe/Berlin``); ValueError naming it if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not a time zone (examples: UTC, Europe/Berlin, America/New_York)"
        ) from None


def parse_duration(value: float | str) -> float:
    """``90``, ``500ms``, ``90s``, ``5m`` (or ``5min``), ``2h``, ``3d``, ``1w`` -> seconds (a
    float; a bare number is seconds). Raises ValueError naming the examples."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as 5m")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError("a duration cannot be negative or infinite")
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (examples: 30, 30s, 5m, 2h, 3d, 1w)")
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]


def _duration(value: object) -> object:
    """A text such as ``90s``, ``30m``, ``1h``, ``2d`` as seconds (``parse_duration``); any
    other value is left for the field's own type to check."""
    return parse_duration(value) if isinstance(value, str) else value


#: an age in seconds (``min_age``/``max_age``); written with a unit or as seconds
Age = Annotated[
    float,
    BeforeValidator(lambda v: parse_duration(v) if v is not None else v),
    Field(ge=0, le=MAX_AGE),
]


#: the upper bound of every duration in the config, in seconds (one week): a wait or a timeout
#: beyond it is a typo, and an infinite one would poison timestamps computed from it
MAX_SECONDS = 7 * 24 * 3600.0

Size = Annotated[int, Field(ge=0, le=MAX_SIZE)]
#: a duration in seconds (or with a unit, see parse_duration), 0 allowed, finite and at most
#: MAX_SECONDS
Seconds = Annotated[float, BeforeValidator(_duration), Field(ge=0, le=MAX_SECONDS)]
#: a duration in seconds (or with a unit), more than 0, finite and at most MAX_SECONDS
PositiveSeconds = Annotated[float, BeforeValidator(_duration), Field(gt=0, le=MAX_SECONDS)]


class Secret:
    """Field metadata: every string in the field's value is a secret (see ``secrets_of``).

    ``Credentials`` marks a mapping whose values are secret only under a credential-like key
    (``headers``); ``SecretUrl`` marks a URL whose password and credential query parameters are.
    Fields typed ``SecretStr`` need no marker.
    """


class Credentials(Secret):
    """Field metadata: a mapping whose values under credential-like keys are secrets."""


class SecretUrl(Secret):
    """Field metadata: a URL whose password and credential query parameters are secrets."""


class ShellVariables(Secret):
    """Field metadata: a shell text whose ``${VAR}`` values (from the environment) are secrets."""


SECRET, CREDENTIALS, SECRET_URL = Secret(), Credentials(), SecretUrl()
SHELL_VARIABLES = ShellVariables()


def _path_text(value: object) -> object:
    """Refuse the path strings no file system takes: empty ones and ones with a NUL byte."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and not text.strip():
            raise ValueError("the path is empty")
        if "\0" in str(text):
            raise ValueError("the path contains a NUL byte")
    return value


#: a file system path; relative paths are taken relative to the config file (see _absolutize)
FsPath = Annotated[Path, BeforeValidator(_path_text)]


class _Model(BaseModel):
    #: ``defer_build``: a model's validator is built when it first validates, not at import;
    #: the models a run never uses (most step kinds, see _validate_step) cost it nothing
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        defer_build=True,
        hide_input_in_errors=True,
        allow_inf_nan=False,
    )


class RetryPolicy(_Model):
    """A step's retry settings: how often, how far apart and for how long a failing step is
    tried again. What they decide (which errors, the backoff, the jitter, when to give up)
    is in ``retry.py``; see docs/configuration.md, "Retries"."""

    model_config = ConfigDict(populate_by_name=True)

    #: tries in all, the first included; None: 5 (``retry.DEFAULT_ATTEMPTS``), except for
    #: network errors, which are tried until ``for`` runs out
    attempts: int | None = Field(None, ge=1, le=1000)
    delay: Seconds = 1.0  #: seconds before the first retry
    backoff: float = Field(2.0, ge=1, le=100)  #: each further wait is multiplied by this
    max_delay: Seconds = 300.0  #: seconds, a cap on one wait
    #: seconds after the first try when retrying stops (``90``, ``30m``, ``1h``); None: no
    #: limit, except 1 h (``retry.NETWORK_FOR_S``) for network errors without ``attempts``
    for_: Annotated[Seconds | None, BeforeValidator(_duration)] = Field(None, alias="for")
    jitter: bool = True  #: spread waits by up to +/-20% so retries do not march in step
    #: Rattail's rule: retry only while the same kind of error repeats
    same_error: bool = False


# --------------------------------------------------------------------------- steps


Dedupe = Literal["none", "content"]


class StepModel(_Model):
    """What every step kind has. A kind is declared once, by its subclass alone:

    - ``kind``, a ``Literal`` field: its name in the config, its tag, and its protocol in the
      journal and the API;
    - ``processor``: the module under ``filedispatch.processors`` whose ``create(step,
      resources)`` builds its processor (imported on first use);
    - ``schemes``: the URL schemes that select it when a step is written as a URL; a kind
      with none is selected by a mapping key of its own name (``command: ...``);
    - its secrets, marked on its fields (``SecretStr``, ``SECRET``, ``CREDENTIALS``,
      ``SECRET_URL``, see ``secrets_of``);

    and it is listed in ``STEP_MODELS``, from which everything else is derived.
    """

    kind: str
    processor: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]] = ()

    retry: RetryPolicy = RetryPolicy()
    concurrency: int | None = Field(None, ge=1, le=1024)  #: at most this many at once
    timeout: PositiveSeconds | None = None  #: seconds one attempt may take
    #: whether the step may hand the later steps another file than it got (a transform):
    #: only such steps count in the later steps' keys (see ``router.step_keys``)
    transforms: ClassVar[bool] = False
    #: ``content``: a file whose bytes (SHA-256) this destination already received is
    #: recorded as a duplicate of that dispatch and not sent again
    dedupe: Dedupe | None = None
    #: files per period, shared by every delivery to this destination: ``10/s``, ``600/min``
    rate: str | None = None
    #: bytes per second, shared by every delivery to this destination: ``5MB/s``
    bandwidth: str | None = None
    #: when this destination may be sent to: ``Mon-Fri 22:00-06:00``, ``08:00-18:00`` or a
    #: cron expression whose minutes are open (``* 22-23,0-5 * * 1-5``); local time unless
    #: the destination has a ``timezone``
    window: str | None = None
    #: ``dedupe`` of the rule this step is in (a step's own wins)
    _rule_dedupe: Dedupe | None = PrivateAttr(None)

    @property
    def deduped(self) -> bool:
        """Whether content dedupe applies (the step's own ``dedupe``, else its rule's)."""
        return (self.dedupe or self._rule_dedupe) == "content"

    @field_validator("rate", "bandwidth", "window")
    @classmethod
    def _control(cls, value: str | None, info: ValidationInfo) -> str | None:
        parse = {"rate": parse_rate, "bandwidth": parse_bandwidth, "window": Window.parse}
        if value is not None:
            parse[str(info.field_name)](value)
        return value

    @classmethod
    def kind_name(cls) -> str:
        return str(cls.model_fields["kind"].default)

    @property
    def display(self) -> str:
        """How the step is shown (log, journal, API, ``check``): never with a secret."""
        raise NotImplementedError

    def identity(self) -> str:
        """Which destination already has a file, whatever the step's other options."""
        raise NotImplementedError


OnConflict = Literal["rename", "overwrite", "skip", "fail"]
#: what is checked after a delivery: nothing, the size that arrived, or its SHA-256
Verify = Literal["none", "size", "sha256"]


class _UrlStep(StepModel):
    """Common to destinations given by URL: a naming template and a conflict policy."""

    #: the password and credential query parameters are secrets; reserved characters in an
    #: unencoded password are percent-encoded on load (see _encode_userinfo)
    url: Annotated[str, SECRET_URL, BeforeValidator(_path_text)]
    #: naming template for the delivered file, relative to the destination folder
    name: str = "{relpath}"
    on_conflict: OnConflict = "rename"
    #: check what arrived before the delivery counts (see docs/integrity.md, item 10)
    verify: Verify = "size"

    @cached_property
    def parts(self) -> Any:
        return urlsplit(self.url)

    def __repr_args__(self) -> Any:  # a repr (in a log or traceback) never shows a password
        for key, value in super().__repr_args__():
            yield key, (redact_url(value) if key == "url" and isinstance(value, str) else value)

    @cached_property
    def display(self) -> str:
        """The URL with its password and credential query parameters replaced by ``***``."""
        return redact_url(self.url)

    @field_validator("url", mode="before")
    @classmethod
    def _userinfo(cls, value: object) -> object:
        return _encode_userinfo(value) if isinstance(value, str) else value

    #: the time zone of the name template's time placeholders (an IANA name such as
    #: ``Europe/Berlin`` or ``UTC``); None: the machine's local time
    timezone: str | None = None
    #: the regex of the rule this step belongs to (its named groups are placeholders)
    _rule_regex: str | None = PrivateAttr(None)

    def identity(self) -> str:
        zone = f":{self.timezone}" if self.timezone else ""  # unset: keys stay as they were
        return f"{self.kind}:{self.display}:{self.name}{zone}"

    @field_validator("name")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value, groups=None)  # named groups: checked by the rule

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            zone_info(value)
        return value

    @cached_property
    def naming(self) -> NameOptions:
        """The rule's regex and the time zone, for ``naming.render_str``."""
        regex = re.compile(self._rule_regex) if self._rule_regex else None
        return NameOptions(regex, zone_info(self.timezone) if self.timezone else None)


class LocalDestination(_UrlStep):
    """A folder on this machine: ``/path``, ``./path``, ``~/path`` or ``file:///path``."""

    kind: Literal["file"] = "file"
    processor: ClassVar[str] = "local"
    schemes: ClassVar[tuple[str, ...]] = ("", "file")
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
    #: the (dotted) JSON field where the server echoes the size it received, for ``verify``
    size_field: str | None = None
    #: the (dotted) JSON field where it echoes the hex SHA-256 it received, for ``verify``
    sha256_field: str | None = None


class HttpTimeout(_Model):
    connect: PositiveSeconds = 30.0  #: seconds to open the connection
    read: PositiveSeconds = 300.0  #: seconds, the longest silence while sending or reading
    total: PositiveSeconds | None = None  #: seconds; none by default: large files take long


class HttpDestination(_UrlStep):
    """An HTTP(S) endpoint; the file is streamed from disk as a raw body or multipart form."""

    kind: Literal["http"] = "http"
    processor: ClassVar[str] = "http"
    schemes: ClassVar[tuple[str, ...]] = ("http", "https")
    name: str = "{name}"
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    fieldname: str | None = None  #: multipart/form-data with the file in this field
    #: extra multipart form fields; values under credential-like names are secrets
    fields: Annotated[dict[str, str], CREDENTIALS] = Field(default_factory=dict)
    chunked: bool = False  #: chunked transfer instead of Content-Length
    #: values under credential-like names (Authorization, X-Api-Key, Cookie ...) are secrets
    headers: Annotated[dict[str, str], CREDENTIALS] = Field(default_factory=dict)
    token: SecretStr | None = None  #: sent as ``Authorization: Bearer ...``
    http_timeout: HttpTimeout = HttpTimeout()
    tls_verify: bool = True  #: check the server's TLS certificate (``verify: true|false`` too)
    ca_file: FsPath | None = None
    expect: Expect = Expect()
    #: bytes read and sent at a time (1 KiB to 64 MiB: each chunk is held in memory)
    chunk_size: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    @field_validator("headers")
    @classmethod
    def _header_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        # RFC 9110 5.1 and 5.5: a name is a token; a value never holds CR, LF or NUL (they
        # would end the header, and aiohttp refuses them only when the first file is sent)
        for name, text in value.items():
            if not _TOKEN_RE.fullmatch(name):
                raise ValueError("a header name must be a token (letters, digits, !#$%&'*+-.^_`|~)")
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"the value of header {name} holds a line break or NUL")
        return value

    _tls_verify = model_validator(mode="before")(lambda data: _tls_spelling(data))

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


def _check_in_place(temp_name: bool, on_conflict: str) -> None:
    """``temp_name: false`` writes the final name as it uploads: a crash or a cut connection
    can leave a partial file there, which ``on_conflict: skip`` would take for the file
    (recorded as delivered, the source consumed unsent)."""
    if not temp_name and on_conflict == "skip":
        raise ValueError(
            "temp_name: false cannot go with on_conflict: skip: a partial file that an "
            "interrupted upload leaves under the final name would count as the file, and the "
            "source would be consumed unsent; keep temp_name: true, or choose on_conflict: "
            "rename, overwrite or fail"
        )


class FtpDestination(_UrlStep):
    """An FTP server (``ftp://``) or FTP with explicit TLS (``ftps://``)."""

    kind: Literal["ftp"] = "ftp"
    processor: ClassVar[str] = "ftp"
    schemes: ClassVar[tuple[str, ...]] = ("ftp", "ftps")
    password: SecretStr | None = None  #: instead of the password in the URL
    passive: bool = True
    connect_timeout: PositiveSeconds = 30.0  #: seconds to connect and log in
    socket_timeout: PositiveSeconds = 60.0  #: seconds, the longest silence on a connection
    pool_size: int = Field(4, ge=1, le=32)  #: connections kept open to this server
    tls_verify: bool = True  #: check the server's TLS certificate (``verify: true|false`` too)
    ca_file: FsPath | None = None
    #: upload under a hidden temporary name, then rename; false: under the final name
    temp_name: bool = True

    _tls_verify = model_validator(mode="before")(lambda data: _tls_spelling(data))

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
        _check_in_place(self.temp_name, self.on_conflict)
        return self


class SftpDestination(_UrlStep):
    """An SSH server reached with SFTP: ``sftp://user@host:port/dir``."""

    kind: Literal["sftp"] = "sftp"
    processor: ClassVar[str] = "sftp"
    schemes: ClassVar[tuple[str, ...]] = ("sftp",)
    password: SecretStr | None = None
    key_file: FsPath | None = None
    passphrase: SecretStr | None = None
    #: a known_hosts file; None uses ~/.ssh/known_hosts
    known_hosts: FsPath | None = None
    #: turns host key checking off; must be said explicitly and is logged as a warning
    insecure_skip_host_key_check: bool = False
    connect_timeout: PositiveSeconds = 30.0  #: seconds to connect and authenticate
    pool_size: int = Field(2, ge=1, le=32)
    temp_name: bool = True  #: as for FTP

    @field_validator("url")
    @classmethod
    def _sftp_url(cls, value: str) -> str:
        _remote_url(value, ("sftp",))
        return value

    @model_validator(mode="after")
    def _one_password(self) -> SftpDestination:
        _check_one_password(self)
        _check_in_place(self.temp_name, self.on_conflict)
        return self


#: S3 user metadata keys and values, and tag keys: what the S3 API accepts in a header
_S3_META_KEY = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_MIB = 1024 * 1024


class S3Destination(_UrlStep):
    """An S3 bucket, on AWS or any S3-compatible server: ``s3://bucket/prefix/``.

    Credentials come from ``access_key_id`` and ``secret_access_key`` when given, else from
    the standard chain (environment, ``profile`` in ~/.aws, instance or container role).
    """

    kind: Literal["s3"] = "s3"
    processor: ClassVar[str] = "s3"
    schemes: ClassVar[tuple[str, ...]] = ("s3",)
    #: another S3 API than AWS (MinIO, Ceph, Garage, ...): ``https://host:port``
    endpoint_url: str | None = None
    region: str | None = None  #: e.g. ``eu-west-1``; None: from the chain, else us-east-1
    access_key_id: str | None = None  #: shown as written (an identifier, not a secret)
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None  #: with temporary credentials
    profile: str | None = None  #: a profile of ~/.aws/config and ~/.aws/credentials
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    storage_class: str | None = None  #: e.g. STANDARD_IA, GLACIER_IR; None: the bucket's
    #: ``x-amz-meta-*`` metadata stored with each object (ASCII names and values)
    metadata: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)  #: object tags
    #: files larger than this go as multipart uploads in parts of this size, in bytes
    #: (5 MiB to 5 GiB; each part in flight is held in memory)
    part_size: int = Field(8 * _MIB, ge=5 * _MIB, le=5 * 1024 * _MIB)
    #: parts of one file sent at once: memory is at most part_size x (part_concurrency + 1)
    part_concurrency: int = Field(4, ge=1, le=64)
    #: abort the multipart uploads under the prefix that a run of filedispatch which is gone
    #: left unfinished (the bucket bills their parts), as the journal's ledger lists them;
    #: nobody else's (processors/s3uploads, docs/cluster.md)
    abort_stale_uploads: bool = True
    connect_timeout: PositiveSeconds = 30.0  #: seconds to open a connection
    read_timeout: PositiveSeconds = 300.0  #: seconds, the longest silence of one request
    tls_verify: bool = True  #: check the endpoint's TLS certificate
    ca_file: FsPath | None = None

    _tls_verify = model_validator(mode="before")(lambda data: _tls_spelling(data))

    @cached_property
    def bucket(self) -> str:
        return str(self.parts.netloc)

    @cached_property
    def display(self) -> str:
        """``s3://bucket/prefix/``, and the server when it is not AWS: one bucket name on two
        servers is two destinations (``identity`` is built from this)."""
        where = redact_url(self.url)
        return f"{where} at {redact_url(self.endpoint_url)}" if self.endpoint_url else where

    @cached_property
    def prefix(self) -> str:
        """The key prefix, ``""`` or ending with ``/``."""
        path = unquote(self.parts.path).strip("/")
        return f"{path}/" if path else ""

    @field_validator("url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme.lower() != "s3":
            raise ValueError("the URL must start with s3://")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError("give credentials as access_key_id and secret_access_key")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc):
            raise ValueError("s3://BUCKET/...: a bucket name is 3-63 of a-z, 0-9, '.' and '-'")
        if parts.query or parts.fragment:
            raise ValueError("an s3:// URL takes no ?query or #fragment")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = _remote_url(value, ("http", "https"))
            if parts.username or parts.password:
                raise ValueError("give credentials as access_key_id and secret_access_key")
            if parts.query or parts.fragment:  # S3 has no use for one, and botocore's own
                # errors quote the endpoint whole, a token in its query with it
                raise ValueError(
                    "an endpoint takes no ?query or #fragment: give credentials as "
                    "access_key_id and secret_access_key"
                )
        return value

    @field_validator("metadata", "tags")
    @classmethod
    def _header_safe(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _S3_META_KEY.fullmatch(name):
                raise ValueError(f"{name!r}: names are ASCII letters, digits and -_.")
            if not text.isascii() or any(c in text for c in "\r\n\0"):
                raise ValueError(f"the value of {name} must be ASCII on one line")
        return value

    @model_validator(mode="after")
    def _key_pair(self) -> S3Destination:
        if importlib.util.find_spec("aiobotocore") is None:
            raise ValueError("s3:// needs the s3 extra: pip install 'filedispatch[s3]'")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give access_key_id and secret_access_key together (or neither)")
        if self.profile is not None and self.access_key_id is not None:
            raise ValueError("give a profile or access_key_id, not both")
        return self


def _remote_url(value: str, schemes: tuple[str, ...]) -> Any:
    """Check a destination URL's scheme, host and port.

    The message never quotes the URL: a password with an unusual character may defeat any
    attempt to find and hide it.
    """
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(
            "not a valid URL (a bad port? write /, ?, # or @ in a password as %2F, %3F, %23, %40)"
        ) from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"the URL must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    return parts


def _tls_spelling(data: Any) -> Any:
    """``verify: true|false`` was the TLS switch before ``verify`` named the arrival check:
    a boolean still means ``tls_verify``."""
    if isinstance(data, dict) and isinstance(data.get("verify"), bool):
        data = dict(data)
        flag = data.pop("verify")
        if "tls_verify" in data:
            raise ValueError("give tls_verify, not both verify: true|false and tls_verify")
        data["tls_verify"] = flag
    return data


def _check_one_password(step: FtpDestination | SftpDestination) -> None:
    if step.password is not None and step.parts.password is not None:
        raise ValueError("give the password in the URL or as password:, not both")


class CommandStep(StepModel):
    """A shell command run on the file; placeholders become quoted variables (see shell.py)."""

    kind: Literal["command"] = "command"
    processor: ClassVar[str] = "command"
    #: ``${VAR}`` in the command is left to the shell (expanded when it runs, from ``env`` and
    #: the service's environment), so its value never shows in the journal, the log or check;
    #: the values of the variables it names are secrets, scrubbed from its output
    command: Annotated[str, SHELL_VARIABLES]
    #: every value is a secret: scrubbed from the command's output, the journal and the log
    env: Annotated[dict[str, str], SECRET] = Field(default_factory=dict)
    #: the command's working folder; None: the chain's private work folder
    cwd: FsPath | None = None

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


class PythonStep(StepModel):
    """A Python callable ``package.module:function`` or ``package.module:Class``."""

    kind: Literal["python"] = "python"
    transforms: ClassVar[bool] = True  #: a callable that returns a file is a transform
    processor: ClassVar[str] = "python"
    python: str
    #: what ``${VAR}`` put into args is a secret; the rest is shown as written
    args: list[Any] = Field(default_factory=list)
    #: values under credential-like names, and what ``${VAR}`` put in, are secrets
    kwargs: Annotated[dict[str, Any], CREDENTIALS] = Field(default_factory=dict)
    #: values the environment substituted into args and kwargs (set by parse_config)
    _from_environment: frozenset[str] = PrivateAttr(default=frozenset())

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


class CompressStep(StepModel):
    """A transform: the later steps of the chain deliver the compressed file instead."""

    kind: Literal["compress"] = "compress"
    transforms: ClassVar[bool] = True
    processor: ClassVar[str] = "compress"
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


#: every step kind, in the order ``check`` and the docs list them: the one list to extend
STEP_MODELS: tuple[type[StepModel], ...] = (
    LocalDestination,
    HttpDestination,
    FtpDestination,
    SftpDestination,
    S3Destination,
    CommandStep,
    PythonStep,
    CompressStep,
)
#: the kinds' names: their tags in the config, their protocols in the journal and the API
STEP_KINDS: tuple[str, ...] = tuple(m.kind_name() for m in STEP_MODELS)
_SCHEME_KIND = {scheme: m.kind_name() for m in STEP_MODELS for scheme in m.schemes}
_KEYED_KINDS = tuple(m.kind_name() for m in STEP_MODELS if not m.schemes)
#: URL schemes of destinations on another host (whose URL may hold a user and password)
REMOTE_SCHEMES = tuple(s for s in _SCHEME_KIND if s not in ("", "file"))


def _step_kind(value: Any) -> str | None:
    if isinstance(value, str):
        value = {"url": value}
    if isinstance(value, BaseModel):
        return str(getattr(value, "kind", None))
    if not isinstance(value, Mapping):
        return None
    for key in _KEYED_KINDS:
        if key in value:
            return key
    url = value.get("url")
    if not isinstance(url, str):
        return None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return _SCHEME_KIND.get(scheme)


def _coerce_step(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


def _or(words: Iterable[str]) -> str:
    *head, last = words
    return f"{', '.join(head)} or {last}" if head else last


_NOT_A_STEP = (
    "not a destination: give a path, a URL "
    f"({', '.join(s for s in _SCHEME_KIND if s)}) "
    f"or a mapping with {_or(('url', *_KEYED_KINDS))}"
)
_MODEL_OF_KIND = {m.kind_name(): m for m in STEP_MODELS}


def _validate_step(value: Any) -> StepModel:
    """One step, validated by the model of its kind alone: a kind's model (and its validator)
    is built the first time a config uses that kind, not at import (start-up time, issue 16).
    The model's errors keep their places under the step (``rules[0].to[1].mode``)."""
    kind = _step_kind(value)
    if kind is None:
        raise PydanticCustomError("destination", _NOT_A_STEP)
    return _MODEL_OF_KIND[kind].model_validate(value)


if TYPE_CHECKING:
    #: one configured step of a rule's ``to`` list, of any kind in STEP_MODELS
    Step: TypeAlias = StepModel
else:  # validated as its kind's model; written out (model_dump) as the model it is
    Step = Annotated[Any, PlainValidator(_validate_step)]

# --------------------------------------------------------------------------- notifications

#: a duration in seconds, written as a number or with a unit: 30s, 15m, 1h, 1d
Duration = Annotated[float, Field(gt=0, le=MAX_SECONDS), BeforeValidator(_duration)]
#: what a notification target is told about
NotifyEvent = Literal["failed", "source_error", "journal", "success", "digest"]
_NOTIFY_DEFAULT: tuple[NotifyEvent, ...] = ("failed", "source_error", "journal")


class NotifyUrl(Secret):
    """Field metadata: an Apprise URL. Its password, credential query parameters and every
    token-like part (10 or more characters mixing letters and digits, as the bot tokens and
    webhook keys of Telegram, Slack, Discord or Matrix URLs are) are secrets."""


NOTIFY_URL = NotifyUrl()


class NotifyTarget(_Model):
    """Where notifications go (an Apprise URL) and which events it wants.

    ``failed``: a file failed for good; ``source_error``: a source folder is gone or its watch
    failed; ``journal``: the journal cannot be written; ``success``: a file was delivered;
    ``digest``: every ``every`` seconds, counts of what happened.
    """

    url: Annotated[str, NOTIFY_URL]
    on: list[NotifyEvent] = Field(default_factory=lambda: list(_NOTIFY_DEFAULT), min_length=1)
    every: Duration = 3600.0  #: seconds between two digests
    #: seconds events are gathered before one message tells them all (a burst is one message)
    window: Duration = 10.0
    #: a message that cannot be sent is tried again this way, then dropped (and logged)
    retry: RetryPolicy = RetryPolicy(attempts=3, delay=2.0, max_delay=60.0)

    @model_validator(mode="before")
    @classmethod
    def _on_key(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare ``on`` key as the boolean true
        if isinstance(data, dict) and True in data:
            data = dict(data)
            data["on"] = data.pop(True)
        return data

    @field_validator("on", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _apprise_url(cls, value: str) -> str:
        if importlib.util.find_spec("apprise") is None:
            raise ValueError("notify: needs the notify extra: pip install 'filedispatch[notify]'")
        import apprise

        if apprise.Apprise.instantiate(value, suppress_exceptions=True) is None:
            raise ValueError(
                "not a notification URL Apprise knows (see "
                "https://github.com/caronc/apprise/wiki for json://, mailto://, slack://, ...)"
            )
        return value

    @cached_property
    def display(self) -> str:
        """The URL as Apprise shows it in privacy mode (tokens and passwords hidden), without
        its query."""
        import apprise

        plugin = apprise.Apprise.instantiate(self.url, suppress_exceptions=True)
        if plugin is None:
            return redact_url(self.url)
        # without the query: Apprise lists every default option there
        return str(plugin.url(privacy=True)).split("?", 1)[0]  # type: ignore[no-untyped-call]

    def __repr_args__(self) -> Any:  # a repr never shows the URL's tokens
        shown = self.display
        for key, value in list(super().__repr_args__()):
            if key != "display":
                yield key, (shown if key == "url" else value)


# --------------------------------------------------------------------------- sources and rules

Ready = Literal["settle", "lock", "done"]
After = Literal["keep", "delete", "move"]
OpenWriters = Literal["check", "ignore"]


class SourceConfig(_Model):
    """A folder to watch and what to do with its files once delivered."""

    path: FsPath
    name: str | None = None  #: how rules and the journal refer to it; defaults to the path
    recursive: bool = False
    process_existing: bool = True
    settle: Seconds = 1.0  #: seconds a file must stay unchanged before it is taken
    ready: Ready = "settle"
    ignore: list[str] = Field(default_factory=list)  #: globs, added to the defaults
    ignore_defaults: bool = True
    after: After = "keep"
    done_dir: FsPath | None = None
    failed_dir: FsPath | None = None
    #: notifications about this source's files and folder (see NotifyTarget)
    notify: list[NotifyTarget] = Field(default_factory=list)
    follow_symlinks: bool = False  #: links followed only where they stay inside the source
    #: ``check``: a file someone still holds open for writing is not complete (a lease, or
    #: /proc where no lease can be had); ``ignore``: only ``ready`` decides
    open_writers: OpenWriters = "check"
    poll: bool | None = None  #: None: poll only on network filesystems
    poll_interval: PositiveSeconds = 1.0  #: seconds between polls
    rescan: Seconds = 60.0  #: seconds between reconcile scans; 0 turns them off
    stop_on_error: bool = False  #: Rattail: a failure stops dispatching from this source
    #: several nodes serve this folder (a shared NFS/SMB mount): one node at a time lists it,
    #: by polling, and any node delivers its files (PostgreSQL journal only)
    shared: bool = False

    @property
    def key(self) -> str:
        return self.name or str(self.path)

    @property
    def ignore_globs(self) -> tuple[str, ...]:
        """The defaults (unless turned off) and ``ignore``, a pattern given as a path inside
        the source made relative to it."""
        root = str(self.path).rstrip("/") + "/"
        own = tuple(p.removeprefix(root) if p.startswith("/") else p for p in self.ignore)
        return (DEFAULT_IGNORE if self.ignore_defaults else ()) + own

    @model_validator(mode="after")
    def _after_needs_done_dir(self) -> SourceConfig:
        if self.after == "move" and self.done_dir is None:
            raise ValueError("after: move needs done_dir")
        if self.shared and self.poll is False:
            raise ValueError(
                "poll: false cannot go with shared: true: a shared folder is listed by polling "
                "(inotify does not see the other hosts' writes)"
            )
        for i, pattern in enumerate(self.ignore):
            if pattern.startswith("/") and not pattern.startswith(str(self.path).rstrip("/") + "/"):
                raise ValueError(
                    f"ignore[{i}]: {pattern!r} starts with / but is not inside this source "
                    f"({self.path}); a pattern is relative to the source (e.g. 'tmp/*')"
                )
        return self


class LearnClassify(_Model):
    """``classify: {learn: ./examples}``: a model trained on example files picks a label.

    ``learn`` holds one sub-folder per label, each with at least five example files. The rule
    takes a file when the most likely label has at least ``min_confidence`` (0..1).
    """

    learn: FsPath
    min_confidence: float = Field(0.6, ge=0, le=1)


def _classify_kind(value: object) -> str:
    return "classify-hook" if isinstance(value, str) else "classify-learn"


#: ``module:function`` (a hook), or a mapping (a learned model); the tags never show in errors
Classify = Annotated[
    Annotated[str, Tag("classify-hook")] | Annotated[LearnClassify, Tag("classify-learn")],
    Discriminator(_classify_kind),
]


class RuleConfig(_Model):
    """Which files go where; rules are tried in order."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    sources: list[str] = Field(default_factory=list)  #: empty: every source
    extensions: list[str] = Field(default_factory=list)
    glob: list[str] = Field(default_factory=list)
    regex: str | None = None
    exclude: list[str] = Field(default_factory=list)
    min_size: Size | None = None  #: bytes (``10KB`` and the like are read as bytes)
    max_size: Size | None = None  #: bytes
    #: seconds since the file was last modified (``30s``, ``5m``, ``2h``, ``3d``): a younger
    #: file waits, and is looked at again once it is old enough
    min_age: Age | None = None
    #: seconds since the file was last modified: an older file is not taken by this rule
    max_age: Age | None = None
    mime: list[str] = Field(default_factory=list)  #: e.g. image/*, application/pdf
    #: ``module:function`` naming the rule a file belongs to, or a learned model's settings
    classify: Classify | None = None
    #: ``content``: for every step of the rule that does not say otherwise (see _Step.dedupe)
    dedupe: Dedupe | None = None
    continue_: bool = Field(False, alias="continue")
    to: list[Step] = Field(min_length=1)
    #: notifications about this rule's deliveries (see NotifyTarget)
    notify: list[NotifyTarget] = Field(default_factory=list)

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

    @property
    def learned(self) -> LearnClassify | None:
        """The learned model's settings, when this rule classifies by one."""
        return self.classify if isinstance(self.classify, LearnClassify) else None

    @model_validator(mode="after")
    def _consistent(self) -> RuleConfig:
        if self.min_age is not None and self.max_age is not None and self.min_age > self.max_age:
            raise ValueError("min_age is larger than max_age: no file could match")
        groups = list(re.compile(self.regex).groupindex) if self.regex else []
        for j, step in enumerate(self.to):
            step._rule_dedupe = self.dedupe
            if isinstance(step, _UrlStep):
                try:
                    check_template(step.name, groups)
                except ValueError as exc:
                    raise ValueError(f"to[{j}].name: {exc}") from None
                step._rule_regex = self.regex
        return self

    @model_validator(mode="after")
    def _label_needs_learn(self) -> RuleConfig:
        if self.learned is None:
            for step in self.to:
                if "{label}" in (getattr(step, "name", "") or "") + getattr(step, "url", ""):
                    raise ValueError(
                        "the {label} placeholder needs classify: {learn: FOLDER} on the rule"
                    )
        return self


#: the shortest API token taken: a short one is guessed by anyone who can reach the port
MIN_TOKEN_LENGTH = 16


def canonical_ip(text: str) -> str | None:
    """An IP address in its canonical form (an IPv4-mapped IPv6 one as IPv4); None: a name."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine only; a name other than
    ``localhost`` may resolve anywhere, so it is not."""
    if host.lower() == "localhost":
        return True
    ip = canonical_ip(host)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def split_host(text: str) -> tuple[str, int | None]:
    """``Example.org:8080`` -> ``("example.org", 8080)``; ``[::1]`` -> ``("::1", None)``.

    The form of an HTTP ``Host`` header (RFC 9110): a name or an IP address, IPv6 in brackets,
    then an optional port. IP addresses come back in their canonical form. Raises ValueError.
    """
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("an IPv6 address needs its closing ]")
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError("not an IPv6 address in [ ]") from None
    else:
        name, _, rest = text.partition(":")
        rest = ":" + rest if _ else ""
    if rest and (not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6):
        raise ValueError("a port is a number after the last :")
    port = int(rest[1:]) if rest else None
    if port is not None and not 0 < port <= 65535:
        raise ValueError("a port is 1-65535")
    if not name or not all(c.isalnum() or c in "-._:" for c in name) or not name.isascii():
        raise ValueError("a host is a name (letters, digits, - . _) or an IP address")
    return canonical_ip(name) or name.lower(), port


class ApiConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(3001, ge=0, le=65535)
    token: SecretStr | None = None
    #: an environment variable holding the token (read at start)
    token_env: str | None = "FILEDISPATCH_API_TOKEN"
    #: more names (``host`` or ``host:port``) the ``Host`` header may give, beside the address
    #: the web app listens on: the names it is reached by through a proxy or on the network
    allowed_hosts: list[str] = []

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_TOKEN_LENGTH} characters (make one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for i, entry in enumerate(value):
            try:
                name, port = split_host(entry.strip())
            except ValueError as exc:
                raise ValueError(f"entry {i + 1} is not host or host:port: {exc}") from None
            shown = f"[{name}]" if ":" in name else name
            out.append(shown if port is None else f"{shown}:{port}")
        return out


class MonitorConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(50101, ge=0, le=65535)
    console: bool = False  #: aiomonitor's Python REPL; off unless asked for
    console_port: int = Field(50102, ge=0, le=65535)
    allow_remote: bool = False  #: needed to listen beyond loopback


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PostgresDatabase(_Model):
    """A PostgreSQL database as the journal (``database: postgresql://user@host:port/name``).

    The URL holds no password: libpq reads it from ``PGPASSWORD``, a service file or a pgpass
    file, or ``password_env`` names the environment variable that holds it.
    """

    url: str
    password_env: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        problem = url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("password_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable")
        return value

    def target(self) -> PostgresTarget:
        return PostgresTarget(self.url, self.password_env)


def _database(value: object) -> object:
    """``database:``: a PostgreSQL URL or mapping becomes a ``PostgresDatabase`` here, so that
    a mistake is one message about the one form meant; anything else must be a path."""
    if isinstance(value, Path | PostgresDatabase):
        return value
    if isinstance(value, str) and is_postgres(value):
        value = {"url": value}
    if isinstance(value, dict):
        try:
            return PostgresDatabase.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            why = str(first["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{where}: {why}" if where else why) from None
    if not isinstance(value, str):
        raise ValueError("must be a path or a postgresql:// URL")
    return _path_text(value)


#: the journal: an SQLite file's path, or a PostgreSQL database
Database = Annotated[Path | PostgresDatabase, BeforeValidator(_database)]


class HistoryConfig(_Model):
    """History retention: how long the journal keeps finished rows (docs/operations.md).

    Only versions whose every row SUCCEEDED are pruned; a pruned version whose source is still
    there keeps a compact key, so it is never sent again. Nothing is pruned by default.
    """

    #: seconds (or ``90d``, ``12w``) a delivered file's rows are kept after it finished
    keep: Annotated[float | None, BeforeValidator(_duration), Field(gt=0, le=MAX_AGE)] = None
    #: at most this many rows: past it, the oldest delivered versions go first, whatever their age
    max_rows: int | None = Field(None, ge=1000)
    #: seconds between pruning passes (the first runs a minute after the start)
    every: Annotated[PositiveSeconds, BeforeValidator(_duration)] = 3600.0

    @property
    def enabled(self) -> bool:
        return self.keep is not None or self.max_rows is not None


class Config(_Model):
    """The whole configuration, as validated from YAML."""

    database: Database | None = None
    workdir: FsPath | None = None  #: where transforms write intermediate files
    workers: int = Field(16, ge=1, le=1024)  #: deliveries in flight at once, all destinations
    shutdown_grace: Seconds = 30.0  #: seconds in-flight work may take at shutdown
    #: this service's name among the nodes sharing a PostgreSQL journal (default: the host name)
    node: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    #: seconds a node's lease lasts unless renewed (on the database's clock); at least one
    #: second: it is renewed every third, and its statements get a third to answer
    lease: Annotated[float, Field(ge=1, le=MAX_SECONDS), BeforeValidator(_duration)] = 30.0
    #: seconds after its lease ended that a dead node holding no work is forgotten (dropped from
    #: the nodes' list); 0 or null: never. A node that still holds work is never forgotten
    forget_nodes_after: (
        Annotated[float, BeforeValidator(_duration), Field(ge=0, le=MAX_AGE)] | None
    ) = 3 * 86400.0
    sources: list[SourceConfig] = Field(min_length=1)
    rules: list[RuleConfig] = Field(min_length=1)
    api: ApiConfig = ApiConfig()
    monitor: MonitorConfig = MonitorConfig()
    history: HistoryConfig = HistoryConfig()
    #: notifications about every source and rule, and about the journal (see NotifyTarget)
    notify: list[NotifyTarget] = Field(default_factory=list)

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
            problems += _absolute_patterns(i, rule, self.sources)
        problems += _dedupe_blind_spots(self.rules)
        if isinstance(self.database, PostgresDatabase):
            problems += _in_place_across_nodes(self.rules)
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

#: names of query parameters, headers and form fields whose values are credentials
_CREDENTIAL_NAME = re.compile(
    r"key|token|secret|pass|pwd|sig|auth|credential|session|cookie|jwt|bearer|private", re.I
)
#: what may follow the ``@`` that ends a userinfo: a host (a name or an [IPv6] literal) and port
_HOST_AFTER_AT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(:[0-9]*)?(?=[/?#]|$)")
_REMOTE_SCHEME = re.compile(rf"^({'|'.join(REMOTE_SCHEMES)})://", re.I)
#: characters left as they are when a userinfo is encoded (RFC 3986 sub-delims and ``%``)
_USERINFO_SAFE = "!$&'()*+,;=%"


def _in_place_across_nodes(rules: list[RuleConfig]) -> list[str]:
    """With a shared journal two nodes may deliver one file: a node that lost its lease and
    the node that took its work over. Under temporary names each upload is its own until its
    rename; written in place (``temp_name: false``) they could mix, or one's clean-up remove
    the other's delivered file."""
    return [
        f"rules[{i}].to[{j}].temp_name: false cannot be used with a PostgreSQL journal: two "
        "nodes may upload one file at once (one whose lease ran out, and the one that took "
        "its work over), and written under the final name their uploads could mix or remove "
        "each other's; keep temp_name: true (a server that cannot rename needs one node, "
        "with an SQLite journal)"
        for i, rule in enumerate(rules)
        for j, step in enumerate(rule.to)
        if getattr(step, "temp_name", True) is False
    ]


def _dedupe_blind_spots(rules: list[RuleConfig]) -> list[str]:
    """``dedupe: content`` finds earlier deliveries by the destination as shown (redacted):
    a deduped step shown like another step with other credentials (``?api_key=A`` and
    ``?api_key=B``, another token, another command ``env``) would take that step's
    deliveries for its own, so such a configuration is refused."""
    if not any(s.deduped for r in rules for s in r.to):
        return []
    steps = [
        (f"rules[{i}].to[{j}]", s, frozenset(secrets_of(s)))
        for i, r in enumerate(rules)
        for j, s in enumerate(r.to)
    ]
    problems = []
    for where, step, mine in steps:
        if not step.deduped:
            continue
        for other_where, other, theirs in steps:
            if other.display == step.display and theirs != mine:
                problems.append(
                    f"{where}.dedupe: content cannot tell this destination from {other_where} "
                    f"({step.display}): both are shown alike but use other credentials; give "
                    "one of them dedupe: none"
                )
                break
    return problems


def _absolute_patterns(i: int, rule: RuleConfig, sources: list[SourceConfig]) -> list[str]:
    """A ``glob``/``exclude`` pattern starting with ``/`` is a path on this machine, tested on
    the file's full path: refused when no source of the rule could hold such a path (it
    would never match)."""
    mine = [s for s in sources if not rule.sources or {s.key, str(s.path)} & set(rule.sources)]
    problems = []
    for key in ("glob", "exclude"):
        for j, pattern in enumerate(getattr(rule, key)):
            if not pattern.startswith("/"):
                continue
            fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rpartition("/")[0] or "/"
            prefix = Path(fixed)
            if not any(
                prefix.is_relative_to(s.path) or Path(s.path).is_relative_to(prefix) for s in mine
            ):
                problems.append(
                    f"rules[{i}].{key}[{j}]: {pattern!r} starts with / (a path on this machine) "
                    "but lies in none of the rule's sources, so it would never match; a pattern "
                    "without the leading / is relative to the source (e.g. 'private/*')"
                )
    return problems


def _encode_userinfo(url: str) -> str:
    """Percent-encode a password written with ``/``, ``?``, ``#`` or ``@`` in a remote URL.

    RFC 3986 ends the authority at the first ``/``, ``?`` or ``#``, so ``sftp://u:47/11@host/``
    would be read as host ``u``, port 47. When the text up to that point holds no ``@`` but
    starts with ``user:`` and an ``@`` followed by a host comes later, that ``@`` ends the
    userinfo. An ``@`` in the path of such a URL must then be written ``%40``.
    """
    match = _REMOTE_SCHEME.match(url)
    if match is None:
        return url
    head, rest = url[: match.end()], url[match.end() :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[:end] or "@" not in rest[end:]:
        return url  # the usual form, or no userinfo at all
    user, colon, _ = rest[:end].partition(":")
    if not colon or not user:
        return url
    at = rest.find("@", end)
    while at >= 0:
        if _HOST_AFTER_AT.match(rest, at + 1):
            password = rest[len(user) + 1 : at]
            encoded = f"{user}:{quote(password, safe=_USERINFO_SAFE)}"
            return f"{head}{encoded}@{rest[at + 1 :]}"
        at = rest.find("@", at + 1)
    return url


def _query_credentials(query: str) -> Iterator[tuple[str, str]]:
    """``(name, value)`` of every credential-like parameter of a query string, as written."""
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and value and _CREDENTIAL_NAME.search(unquote_plus(name)):
            yield name, value


def redact_url(url: str) -> str:
    """``ftp://user:secret@host/x?token=t`` -> ``ftp://user:***@host/x?token=***``.

    The password and the values of credential-like query parameters (``key``, ``token``,
    ``secret``, ``password``, ``sig``, ``auth``, ``api_key``, ``access_token``, ... in any
    case) are hidden; other text is unchanged.
    """
    try:
        parts = urlsplit(_encode_userinfo(url))
        password = parts.password
    except ValueError:
        return url
    if not parts.netloc:
        return url
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    if parts.query and any(_query_credentials(parts.query)):
        pairs = []
        for pair in parts.query.split("&"):
            name, eq, value = pair.partition("=")
            hidden = eq and value and _CREDENTIAL_NAME.search(unquote_plus(name))
            pairs.append(f"{name}=***" if hidden else pair)
        parts = parts._replace(query="&".join(pairs))
    return parts.geturl()


def _url_secrets(url: str) -> Iterator[str]:
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    if password:  # as written, decoded (what is sent) and encoded
        yield from (password, unquote(password), quote(password, safe=""))
        # an HTTP server may echo the Basic Authorization header back
        basic = f"{unquote(user or '')}:{unquote(password)}".encode()
        yield base64.b64encode(basic).decode()
    for _, value in _query_credentials(parts.query):
        yield from (value, unquote_plus(value))


_TOKEN_PART = re.compile(r"[^/?#&=:@.]{10,}")


def _notify_url_secrets(url: str) -> Iterator[str]:
    """An Apprise URL's secrets: as any URL's, and the token-like parts of its host and path
    (10+ characters holding letters and digits: a bot token, a webhook id or key)."""
    yield from _url_secrets(url)
    rest = url.split("://", 1)[-1]
    for part in _TOKEN_PART.findall(rest):
        if re.search(r"[A-Za-z]", part) and re.search(r"[0-9]", part):
            yield from (part, unquote(part))
    yield from _apprise_private_parts(url)


_URL_PARTS = re.compile(r"[/?#&=@]+")


def _apprise_private_parts(url: str) -> Iterator[str]:
    """The parts of ``url`` that Apprise's privacy mode hides (a token of letters only, which
    the rule above misses, is one): Apprise itself logs them at DEBUG (a Mattermost or
    Telegram URL with its token)."""
    try:
        import apprise
    except ImportError:  # without the notify extra, no Apprise logs either
        return
    plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin is None:
        return
    private = str(plugin.url(privacy=True))  # type: ignore[no-untyped-call]
    full = str(plugin.url(privacy=False))  # type: ignore[no-untyped-call]
    for part in set(_URL_PARTS.split(full)) - set(_URL_PARTS.split(private)):
        if len(part) >= _MIN_PRIVATE_CHARS:
            yield from (part, unquote(part))


#: shorter parts Apprise hides are left to the rules above (a webhook id of a few digits would
#: otherwise hide every such number in the log)
_MIN_PRIVATE_CHARS = 6


def _strings(value: Any) -> Iterator[str]:
    """Every string in a value of YAML shapes (nested lists and mappings), keys excepted."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _declared_secrets(model: BaseModel) -> Iterator[str]:
    """The values of the fields ``model`` and the models inside it declare secret."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        marks = [m for m in info.metadata if isinstance(m, Secret)]
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
        elif any(isinstance(m, NotifyUrl) for m in marks) and isinstance(value, str):
            yield from _notify_url_secrets(value)
        elif any(isinstance(m, SecretUrl) for m in marks) and isinstance(value, str):
            yield from _url_secrets(value)
        elif any(isinstance(m, ShellVariables) for m in marks) and isinstance(value, str):
            for match in _SHELL_VAR_RE.finditer(value):
                yield os.environ.get(match.group(1) or match.group(2), "")
        elif any(isinstance(m, Credentials) for m in marks) and isinstance(value, Mapping):
            for key, item in value.items():
                if _CREDENTIAL_NAME.search(str(key)):
                    yield from _strings(item)
        elif marks:
            yield from _strings(value)
        elif isinstance(value, BaseModel):
            yield from _declared_secrets(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, BaseModel):
                    yield from _declared_secrets(item)
    if isinstance(model, PythonStep):
        yield from model._from_environment


#: shorter values are not scrubbed: hiding every "a" or "42" would garble every message
MIN_SECRET_CHARS = 3
#: the shortest piece of a secret hidden where a message was cut short through it
MIN_CUT_CHARS = 4
#: what a shortened message shows where text was left out (reprlib, our own reasons)
_ELLIPSES = ("...", "\u2026")


def secrets_of(config: Config | BaseModel) -> list[str]:
    """Every secret string in the config (or in one step of it), longest first.

    For scrubbing free text (a command's output, an exception, a log line, a journal reason,
    an API answer): replace each with ``***`` in this order. Secrets are the fields declared
    so on the models: ``SecretStr`` fields (passwords, passphrases, tokens), URL passwords
    (as written, decoded, encoded and as HTTP Basic credentials), credential-like query
    parameters, credential-like headers and form fields, a command step's ``env`` values and
    a Python step's ``args`` and ``kwargs``. Values shorter than MIN_SECRET_CHARS are left out.
    """
    found = set(_declared_secrets(config))
    api = getattr(config, "api", None)
    if isinstance(api, ApiConfig) and api.token is None and api.token_env:
        found.add(os.environ.get(api.token_env, ""))  # the token the service will read
    database = getattr(config, "database", None)
    if isinstance(database, PostgresDatabase):  # the password the journal will read
        found.add(os.environ.get(database.password_env or "PGPASSWORD", ""))
    return sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` (longest first, as secrets_of gives them) as ``***``.

    A message shortened before it got here (an HTTP answer quoted up to 200 characters, the
    tail of a command's output, an exception cut at 1000, ``reprlib``) may hold only a piece
    of a secret where it was cut: at its start or end, or beside ``...``. Such a piece of
    MIN_CUT_CHARS or more is hidden too.
    """
    secrets = list(secrets)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    for secret in secrets:
        if len(secret) > MIN_CUT_CHARS:
            text = _scrub_cut(text, secret)
    return text


def _scrub_cut(text: str, secret: str) -> str:
    marks = [m for m in _ELLIPSES if m in text]
    for k in range(len(secret) - 1, MIN_CUT_CHARS - 1, -1):
        head, tail = secret[:k], secret[-k:]
        if text.endswith(head):
            text = text[:-k] + "***"
        if text.startswith(tail):
            text = "***" + text[k:]
        for mark in marks:
            text = text.replace(head + mark, "***" + mark).replace(mark + tail, mark + "***")
    return text


# --------------------------------------------------------------------------- loading


#: where a value taken from the environment is a secret though the field is not declared one
_ENV_SECRET_PLACE = re.compile(r"\.(args|kwargs)\b")


def _substitute_env(
    node: Any, path: str, problems: list[str], secret: set[str] | None = None
) -> Any:
    """``node`` with ``${VAR}`` replaced; values put into a Python step's arguments go to
    ``secret`` (an operator takes a value from the environment to keep it out of the file)."""
    if isinstance(node, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name, default)
            if value is None:
                problems.append(f"{path or '<top>'}: environment variable {name} is not set")
                return ""
            if secret is not None and name in os.environ and _ENV_SECRET_PLACE.search(path):
                secret.add(value)
            return value

        return _ENV_RE.sub(repl, node)
    if isinstance(node, list):
        return [_substitute_env(v, f"{path}[{i}]", problems, secret) for i, v in enumerate(node)]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            if k == "command" and isinstance(v, str):
                # left to the shell, so the value never becomes part of the step's text
                env = node.get("env")
                given = set(env) if isinstance(env, dict) else set()
                for match in _ENV_RE.finditer(v):
                    name, default = match.group(1), match.group(2)
                    if default is None and name not in given and name not in os.environ:
                        problems.append(f"{where}: environment variable {name} is not set")
                out[k] = v
            else:
                out[k] = _substitute_env(v, where, problems, secret)
        return out
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
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "classify-")):
            continue  # a union's tag, not a field
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


def real(path: Path) -> Path:
    """``path`` with ``~``, ``..`` and every symbolic link resolved, as the kernel would.

    Works for paths that do not exist yet: the longest existing prefix is resolved (links
    included) and the rest appended, so two spellings of one place compare equal.
    """
    return Path(os.path.realpath(os.path.expanduser(path)))


def real_roots(sources: Iterable[SourceConfig]) -> list[Path]:
    """The folders of ``sources``, resolved (``real``): the ``roots`` of ``real_outside``."""
    return [real(s.path) for s in sources]


#: how many symbolic links ``real_outside`` follows before it gives up (Linux's MAXSYMLINKS)
MAX_LINKS = 40


def real_outside(path: Path, roots: Iterable[Path]) -> Path:
    """``path`` resolved as ``real`` does, except that no symbolic link is followed inside a
    source: ``roots`` are the sources' folders, resolved (``real``). The walk resolves part
    by part; once it stands in a source folder, the rest of the path is appended as written,
    and any link there is left for the caller to refuse (``sourcefile.held_folder``).

    For a ``done_dir`` or ``failed_dir`` inside an inbox, which whoever writes the inbox may
    replace with a link (to /etc/cron.d...) while the service is stopped: resolved by
    ``real`` at the next start, files would be moved through it. Links the operator made
    outside the sources (``/srv/done`` -> ``/mnt/big/done``) are followed. Raises OSError
    (ELOOP) past ``MAX_LINKS`` links."""
    inside = [str(r) for r in roots]

    def in_a_source(p: str) -> bool:
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in inside)

    raw = os.path.join(os.getcwd(), os.path.expanduser(path))  # ".." is walked, not cut
    parts = raw.split("/")
    done, links = "/", 0
    while parts:
        if in_a_source(done):
            return Path(os.path.normpath(os.path.join(done, *parts)))
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            done = os.path.dirname(done)
            continue
        step = os.path.join(done, part)
        try:
            target = os.readlink(step)
        except OSError:  # not a link, or not there (yet): as it is written
            done = step
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links")
        if target.startswith("/"):
            done = "/"
        parts[:0] = target.split("/")
    return Path(done)


def _check_paths(config: Config) -> list[str]:
    """Places that would feed the service its own output; every path compared resolved."""
    problems = []
    for i, src in enumerate(config.sources):
        root = real(src.path)
        for loc, folder in config.iter_local_roots():
            if watches_folder(src, folder):
                problems.append(
                    f"{loc}.url: the destination {folder} is inside the watched source "
                    f"sources[{i}] ({root}); files would be dispatched in a loop"
                )
        for key in ("done_dir", "failed_dir"):
            folder = getattr(src, key)
            if folder is not None and real(folder) == root:
                problems.append(f"sources[{i}].{key}: must not be the source folder itself")
        for key in ("database", "workdir"):
            path = getattr(config, key)
            if not isinstance(path, Path):  # none, or a database server
                continue
            inside = key == "workdir" and watches_folder(src, path)
            if inside or watched_by(src, path):
                problems.append(
                    f"{key}: {path} is inside the watched source sources[{i}] ({root}); "
                    "its own files would be dispatched"
                )
    return problems


def _check_token_env(api: ApiConfig) -> list[str]:
    """The token from the environment is held to the rule of ``api.token`` (never echoed)."""
    if not api.enabled or api.token_env is None:
        return []
    if api.token is not None and api.token.get_secret_value():
        return []  # api.token wins; the variable is not read
    value = os.environ.get(api.token_env, "")
    if 0 < len(value) < MIN_TOKEN_LENGTH:
        return [
            f"api.token_env: the token in the environment variable {api.token_env} must be "
            f"at least {MIN_TOKEN_LENGTH} characters"
        ]
    return []


def watches_folder(source: SourceConfig, folder: Path) -> bool:
    """Whether files put in ``folder`` would be seen by the watcher of ``source`` (resolved)."""
    folder, root = real(folder), real(source.path)
    return folder == root or (source.recursive and root in folder.parents)


def watched_by(source: SourceConfig, path: Path) -> bool:
    """Whether a file at ``path`` would be seen by the watcher of ``source`` (resolved)."""
    return watches_folder(source, real(path).parent)


def _items(value: Any) -> list[Any]:
    """``value`` if it is a list, else nothing (the model names what it should have been)."""
    return value if isinstance(value, list) else []


def _absolutize(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are taken relative to the config file's folder."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            return value  # refused by the model, naming the field
        if "://" not in value and not os.path.isabs(value):
            return str(base / os.path.expanduser(value))
        return value

    for key in ("database", "workdir"):
        if key in raw:
            raw[key] = fix(raw[key])
    for src in _items(raw.get("sources")):
        if isinstance(src, dict):
            for key in ("path", "done_dir", "failed_dir"):
                if key in src:
                    src[key] = fix(src[key])
    for rule in _items(raw.get("rules")):
        if not isinstance(rule, dict):
            continue
        learn = rule.get("classify")
        if isinstance(learn, dict) and isinstance(learn.get("learn"), str):
            rule["classify"] = {**learn, "learn": fix(os.path.expanduser(learn["learn"]))}
        to = rule.get("to")
        steps = to if isinstance(to, list) else [to]
        fixed = []
        for step in steps:
            if isinstance(step, str):
                step = fix(step) if not step.startswith("~") else os.path.expanduser(step)
            elif isinstance(step, dict) and isinstance(step.get("url"), str):
                url = step["url"]
                step = {**step, "url": fix(url) if not url.startswith("~") else url}
            if isinstance(step, dict):
                # command steps' folder; TLS and SSH files (relative to the config, like every
                # other path in it, not to wherever the service was started)
                for key in ("cwd", "ca_file", "key_file", "known_hosts"):
                    if isinstance(step.get(key), str):
                        step = {**step, key: fix(os.path.expanduser(step[key]))}
            fixed.append(step)
        if to is not None:
            rule["to"] = fixed


def parse_config(raw: Any, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must hold a mapping (keys such as sources, rules)"])
    problems: list[str] = []
    from_environment: set[str] = set()
    raw = _substitute_env(raw, "", problems, from_environment)
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
    problems = _check_paths(config) + _check_token_env(config.api)
    if problems:
        raise ConfigError(source, problems)
    for rule in config.rules:
        for step in rule.to:
            if isinstance(step, PythonStep) and from_environment:
                given = list(_strings(step.args)) + list(_strings(step.kwargs))
                step._from_environment = frozenset(
                    v for v in from_environment if any(v in text for text in given)
                )
    return config


#: the most nodes a document may hold once its aliases are expanded; real configurations hold
#: hundreds, and a few hundred bytes of nested aliases ("billion laughs") would hold billions
MAX_NODES = 20_000


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults`` may be overridden: that is what it is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} is given twice (lines {seen[key]} and {line}); "
                        "the first value would be ignored",
                        key_node.start_mark,
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_document(raw: Any) -> list[str]:
    """Aliases beyond MAX_NODES expanded nodes, alias cycles, and NaN or infinite numbers.

    Counts without expanding: a node met again through an alias costs its size once more,
    which is memoised, so even a billion-laughs document is measured in a few steps.
    """
    sizes: dict[int, int] = {}
    problems: list[str] = []
    active: set[int] = set()

    def size(node: Any, where: str) -> int:
        if isinstance(node, float) and not math.isfinite(node):
            problems.append(f"{where or '<top>'}: {node} is not a usable number")
            return 1
        if not isinstance(node, (list, dict)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ValueError(f"{where}: an alias refers to a node that contains it")
        active.add(id(node))
        total = 1
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            inner = f"{where}[{key}]" if isinstance(node, list) else f"{where}.{key}"
            total += size(value, inner.lstrip("."))
            if total > MAX_NODES:
                break
        active.discard(id(node))
        sizes[id(node)] = total
        return total

    try:
        total = size(raw, "")
    except ValueError as exc:
        return [str(exc)]
    except RecursionError:
        return ["the document is nested too deeply"]
    if total > MAX_NODES:
        return [
            f"the document expands to more than {MAX_NODES} values (aliases repeated "
            "inside aliases?); write the configuration out"
        ]
    return problems


def _places(config: Config) -> list[str]:
    """Folders the service will need that cannot be there: under a file, or not creatable.

    Reads the file system (never writes): only load_config calls it, not parse_config.
    """
    wanted: list[tuple[str, Path]] = []
    for i, src in enumerate(config.sources):
        wanted.append((f"sources[{i}].path", src.path))
        for key in ("done_dir", "failed_dir"):
            folder = getattr(src, key)
            if folder is not None:
                wanted.append((f"sources[{i}].{key}", folder))
    if isinstance(config.database, Path):
        wanted.append(("database", config.database.parent))
    if config.workdir is not None:
        wanted.append(("workdir", config.workdir))
    # local destinations are not checked: one may be a mount that comes later, and a
    # destination that cannot be made fails its own files, with the reason, not the service
    found = ((where, folder_problem(folder)) for where, folder in wanted)
    return [f"{where}: {problem}" for where, problem in found if problem]


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` can be neither used nor created, or None if it can.

    A folder that exists must be a folder; one that does not must have its nearest existing
    ancestor be a folder this process may write into.
    """
    try:
        path = Path(os.path.expanduser(folder)).absolute()
        if path.exists():
            return None if path.is_dir() else f"{path} exists and is not a folder"
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"{path} cannot be created: {ancestor} is not a folder"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"{path} cannot be created: {ancestor} is not writable"
    except (OSError, ValueError) as exc:
        return f"{folder} cannot be used: {getattr(exc, 'strerror', None) or exc}"
    return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; relative paths inside it are relative to it.

    Beyond parse_config, refuses keys given twice, alias bombs, NaN and infinities, and
    folders (sources, done_dir, failed_dir, the journal's, workdir) that can neither be used
    nor created. Raises ConfigError naming the file and each field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not UTF-8 text"]) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader that also refuses duplicate keys
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(str(path), ["the document is nested too deeply"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(str(path), [f"{where}{problem}"]) from None
    problems = _check_document(raw)
    if problems:
        raise ConfigError(str(path), problems)
    config = parse_config(raw, str(path), path.absolute().parent)
    problems = _places(config)
    if problems:
        raise ConfigError(str(path), problems)
    return config
