"""Shell command templates: ``{path}``-style placeholders compiled into quoted variable expansions.

A file name is never pasted into the shell's text: each placeholder becomes a reference to an
environment variable holding the value (``"${FILEDISPATCH_PATH}"``), so ``$(rm -rf ~).txt`` is
only a name whatever quotes surround the placeholder. Pure functions; nothing here runs a shell.
"""

from __future__ import annotations

#: placeholder -> the environment variable that carries its value; ``{}`` is dirsend's ``{path}``
PLACEHOLDERS: dict[str, str] = {
    "": "FILEDISPATCH_PATH",
    "path": "FILEDISPATCH_PATH",
    "name": "FILEDISPATCH_NAME",
    "stem": "FILEDISPATCH_STEM",
    "ext": "FILEDISPATCH_EXT",
    "relpath": "FILEDISPATCH_RELPATH",
    "source": "FILEDISPATCH_SOURCE",
}
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def compile_command(template: str) -> str:
    """The shell script for ``template``; ValueError names an unknown placeholder or bad quoting.

    ``{{`` and ``}}`` are literal braces; ``${VAR}`` and braces that do not enclose a bare word
    (``{a,b}``, ``{ cmd; }``, awk's ``'{ print $1 }'``) are left to the shell. The quote state
    is tracked so each reference is expanded as exactly one word inside or outside quotes.
    """
    if not template.strip():
        raise ValueError("the command is empty")
    out: list[str] = []
    quote = ""  # "", "'" or '"': the quoting in force at this point of the template
    nested: list[str] = []  # the quoting outside each enclosing $( ... )
    depth = 0  # plain parentheses open inside the innermost $( ... )
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if template.startswith(("{{", "}}"), i):
            out.append(c)
            i += 2
            continue
        if c == "{" and not template.startswith("${", i - 1 if i else 0):
            end = template.find("}", i)
            word = template[i + 1 : end] if end > 0 else "-"
            if set(word) <= _WORD:
                if word not in PLACEHOLDERS:
                    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                    raise ValueError(
                        f"unknown placeholder {{{word}}}; known: {known} "
                        "(write {{ and }} for literal braces)"
                    )
                out.append(_reference(PLACEHOLDERS[word], quote))
                i = end + 1
                continue
        if c == "\\" and quote != "'":
            out.append(template[i : i + 2])
            i += 2
            continue
        if quote != "'" and template.startswith("$(", i):  # quoting starts afresh inside
            nested.append(quote)
            quote = ""
            out.append("$(")
            i += 2
            continue
        if quote == "" and nested and c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                depth, quote = 0, nested.pop()
        elif quote == "" and c in "'\"":
            quote = c
        elif c == quote:
            quote = ""
        out.append(c)
        i += 1
    if quote or nested:
        raise ValueError(f"the command has an unterminated {quote + ' quote' if quote else '$('}")
    return "".join(out)


def _reference(var: str, quote: str) -> str:
    if quote == '"':
        return "${" + var + "}"
    if quote == "'":  # close the single quotes, expand in double quotes, reopen
        return "'\"${" + var + "}\"'"
    return '"${' + var + '}"'


def placeholder_values(path: str, relpath: str, source: str) -> dict[str, str]:
    """The environment variables behind the placeholders, for the file at ``path``."""
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot + 1 :]) if dot > 0 else (name, "")
    return {
        "FILEDISPATCH_PATH": path,
        "FILEDISPATCH_NAME": name,
        "FILEDISPATCH_STEM": stem,
        "FILEDISPATCH_EXT": ext,
        "FILEDISPATCH_RELPATH": relpath,
        "FILEDISPATCH_SOURCE": source,
    }
