"""`${env:NAME}` and `${file:/path}` references inside policy strings.

A reference may be the whole value or part of it (`Bearer ${env:TOKEN}`); `$${` writes a
literal `${`. File contents lose their trailing newline; a relative file path is taken
from the policy file's directory. Messages name the variable or file, never the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["MAX_SECRET_FILE", "SecretIssue", "has_reference", "resolve_string", "resolve_tree"]

MAX_SECRET_FILE = 1024 * 1024
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)

PathPart = str | int


@dataclass(frozen=True)
class SecretIssue:
    """One reference that could not be resolved.

    kind `missing`: an unset variable or unreadable file (an error for `run`, a warning
    for `check`); kind `syntax`: a malformed reference (always an error).
    """

    path: tuple[PathPart, ...]
    message: str
    kind: Literal["missing", "syntax"]


def has_reference(text: str) -> bool:
    return "${" in text


def _read_file(raw_path: str, base_dir: Path | None) -> tuple[str | None, str | None]:
    path = Path(raw_path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        return None, f"cannot read secret file {raw_path}: {exc.strerror or type(exc).__name__}"
    if len(data) > MAX_SECRET_FILE:
        return None, f"secret file {raw_path} is larger than 1MiB"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"secret file {raw_path} is not UTF-8 text"
    return text.rstrip("\r\n"), None


def resolve_string(
    text: str,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    path: tuple[PathPart, ...] = (),
    values: set[str] | None = None,
    missing: str = "",
) -> tuple[str, list[SecretIssue]]:
    """The text with every reference replaced; an unresolved reference becomes `missing`
    (``""`` by default; `egressd check` passes a stand-in so that a field that must not be
    empty, such as an OAuth `client_id`, is judged by its other rules, not by the hole).

    Each secret value substituted is added to `values` (so callers can scrub messages).
    """
    if "${" not in text:
        return text, []
    env = os.environ if environ is None else environ
    out: list[str] = []
    issues: list[SecretIssue] = []
    i = 0
    while True:
        j = text.find("${", i)
        if j < 0:
            out.append(text[i:])
            break
        if j > i and text[j - 1] == "$":  # `$${` is a literal `${`
            out.append(text[i : j - 1])
            out.append("${")
            i = j + 2
            continue
        out.append(text[i:j])
        end = text.find("}", j + 2)
        if end < 0:
            issues.append(SecretIssue(path, "unterminated '${' (write '$${' for a literal '${')", "syntax"))
            break
        body = text[j + 2 : end]
        kind, sep, arg = body.partition(":")
        value = ""
        if kind == "env" and sep and _ENV_NAME_RE.fullmatch(arg):
            found = env.get(arg)
            if found is None:
                issues.append(SecretIssue(path, f"environment variable {arg} is not set", "missing"))
                value = missing
            else:
                value = found
                if values is not None and value:
                    values.add(value)
        elif kind == "file" and sep and arg.strip():
            content, problem = _read_file(arg.strip(), base_dir)
            if problem is not None:
                issues.append(SecretIssue(path, problem, "missing"))
                value = missing
            else:
                value = content or ""
                if values is not None and value:
                    values.add(value)
        else:
            shown = body if len(body) <= 40 else body[:37] + "..."
            issues.append(
                SecretIssue(
                    path,
                    f"bad secret reference '${{{shown}}}': use ${{env:NAME}} or ${{file:/path}} "
                    "(write '$${' for a literal '${')",
                    "syntax",
                )
            )
        out.append(value)
        i = end + 1
    return "".join(out), issues


def resolve_tree(
    data: Any,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    path: tuple[PathPart, ...] = (),
    values: set[str] | None = None,
    missing: str = "",
) -> tuple[Any, list[SecretIssue]]:
    """A copy of `data` (YAML-shaped: dicts, lists, scalars) with every string resolved
    (`missing`: what an unresolved reference becomes, see `resolve_string`)."""
    issues: list[SecretIssue] = []

    def walk(v: Any, p: tuple[PathPart, ...]) -> Any:
        if isinstance(v, str):
            value, found = resolve_string(
                v, environ=environ, base_dir=base_dir, path=p, values=values, missing=missing
            )
            issues.extend(found)
            return value
        if isinstance(v, dict):
            return {k: walk(x, (*p, k if isinstance(k, str | int) else str(k))) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, (*p, n)) for n, x in enumerate(v)]
        return v

    return walk(data, path), issues
