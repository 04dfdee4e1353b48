"""Loading a policy directory: YAML with line numbers, secrets, validation, cross-checks.

`load_policy_dir` never raises. It returns every problem it found (not just the first),
each one printable as one line, ``FILE:LINE: upstream NAME: FIELD: what is wrong``, and a
`PolicySet` only when there is no error. It is pure apart from reading the directory,
the crosswalk files and `${file:}` secrets, and looking up the installed provider plugins
(the failover checks ask them what they translate): no network, no global state.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from plugins.base import ProviderPlugin
from plugins.registry import available, load_plugin
from proxy.config.schema import UPSTREAM_NAME_RE, Crosswalk, Policy, split_host_port
from proxy.config.secrets import resolve_tree

__all__ = ["LoadResult", "PolicySet", "Problem", "load_policy_dir", "policy_json_schema"]

Severity = Literal["error", "warning"]
Loc = tuple[str | int, ...]

MAX_VALUES_PER_DOCUMENT = 100_000  # after alias expansion: stops "billion laughs" documents
MAX_FILE_SIZE = 16 * 1024 * 1024
UNSET_SECRET = "unset"  # what an unset `${env:}` / unreadable `${file:}` secret reads as
_CONTEXT = {"source": "yaml", "crosswalk_files_loaded": True}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the policy set, printable as one line."""

    file: str
    line: int | None
    upstream: str | None
    field: str | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        """`FILE:LINE: upstream NAME: FIELD: message`; a warning has `warning: ` after the
        place (`FILE:LINE: warning: upstream NAME: ...`, contract 7.7)."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.severity == "warning":
            parts.append("warning")
        if self.upstream:
            parts.append(f"upstream {self.upstream}")
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True)
class PolicySet:
    """A validated set of policies, one per upstream, in file order."""

    policies: tuple[Policy, ...]
    version: str
    files: tuple[str, ...]
    crosswalk_files: tuple[str, ...] = ()  # files named by failover[].crosswalk_file

    def by_name(self) -> dict[str, Policy]:
        return {p.upstream: p for p in self.policies}


@dataclass(frozen=True)
class LoadResult:
    policy_set: PolicySet | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of one policy document (for editors; `egressd schema` prints it)."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "egressd policy"
    return schema


# ---- YAML -------------------------------------------------------------------------------


class PolicyYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `on`, `off`, `yes`, `no` are strings (so the
    `on:` key of retry and failover stays a key), and so are dates and `1:30`."""

    yaml_implicit_resolvers: dict[Any, Any] = {}


for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
):
    PolicyYamlLoader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _yaml_error(exc: yaml.YAMLError, text: str = "") -> tuple[int | None, str]:
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1 if text else None
        char = exc.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return line, f"invalid YAML: unacceptable character {shown} ({exc.reason})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        text = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            text = f"{exc.context}, {exc.problem}"
        return (int(mark.line) + 1 if mark is not None else None), f"invalid YAML: {text}"
    return None, f"invalid YAML: {exc}"


def _locate(node: Node, loc: Iterable[str | int]) -> int:
    """Line of the YAML node at `loc`, or of its nearest ancestor that exists."""
    line = _line(node)
    cur: Node = node
    for part in loc:
        if isinstance(cur, MappingNode):
            hit: tuple[Node, Node] | None = None
            for key, value in cur.value:
                if isinstance(key, ScalarNode) and key.value == str(part):
                    hit = (key, value)
            if hit is None:
                break
            line = _line(hit[0])
            cur = hit[1]
        elif isinstance(cur, SequenceNode) and isinstance(part, int) and 0 <= part < len(cur.value):
            cur = cur.value[part]
            line = _line(cur)
        else:
            break
    return line


def _dotted(loc: Iterable[str | int]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            text = str(part)
            if not text or not text.isprintable() or len(text) > 64:
                text = repr(text[:64])
            out += f".{text}" if out else text
    return out or None


def _one_line(text: str) -> str:
    return " ".join(text.split()) if not text.isprintable() or "  " in text else text


@dataclass
class _Walk:
    """Duplicate keys and the expanded size of one document, found in one pass."""

    duplicates: list[tuple[Loc, int, int]] = field(default_factory=list)  # path, line, first line
    too_big: bool = False
    recursive: bool = False


def _inspect(root: Node) -> _Walk:
    result = _Walk()
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node, path: Loc) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            result.recursive = True
            return 0
        active.add(key)
        total = 1
        if isinstance(node, MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        result.duplicates.append(((*path, k.value), _line(k), seen[k.value]))
                    else:
                        seen[k.value] = _line(k)
                name = k.value if isinstance(k, ScalarNode) else "?"
                total += size(k, path) + size(v, (*path, name))
                if total > MAX_VALUES_PER_DOCUMENT:
                    break
        elif isinstance(node, SequenceNode):
            for n, v in enumerate(node.value):
                total += size(v, (*path, n))
                if total > MAX_VALUES_PER_DOCUMENT:
                    break
        active.discard(key)
        sizes[key] = total
        if total > MAX_VALUES_PER_DOCUMENT:
            result.too_big = True
        return total

    size(root, ())
    return result


# ---- pydantic errors -> human text ------------------------------------------------------


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if cls is None:
            return None
        info = cls.model_fields.get(part)
        if info is None:
            return None
        cls = _model_in(info.annotation)
    return cls


_YAML_TYPES: dict[type, str] = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true/false",
    type(None): "nothing (null)",
}


def _got(value: Any) -> str:
    return _YAML_TYPES.get(type(value), type(value).__name__)


def _message(err: Any, root: type[BaseModel]) -> str:
    kind = str(err.get("type", ""))
    msg = str(err.get("msg", "invalid value"))
    loc: Loc = tuple(err.get("loc", ()))
    value = err.get("input")
    if kind == "extra_forbidden" and loc:
        model = _model_at(root, loc[:-1])
        if model is None:
            return "unknown field"
        allowed = list(model.model_fields)
        hint = ""
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if close:
            hint = f", did you mean '{close[0]}'?"
        return f"unknown field{hint} (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return "required field missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    if kind in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"should be a mapping (key: value), got {_got(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"should be a list, got {_got(value)}"
    if kind == "string_type":
        return f"should be a string, got {_got(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"should be true or false, got {_got(value)}"
    if msg == "Keys should be strings":
        return "keys should be strings"
    for prefix in ("Input ", "String ", "Value ", "List "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


# ---- loading ----------------------------------------------------------------------------


@dataclass
class _Doc:
    """One document's facts for the cross-checks, taken from the raw data so that a
    document with other errors still takes part (no spurious "no upstream named ...")."""

    file: str
    node: Node
    name: str | None
    port: int | None
    failover_to: list[tuple[int, str]]
    policy: Policy | None


@dataclass
class _State:
    secrets: Literal["strict", "lenient"]
    environ: Mapping[str, str] | None
    problems: list[Problem] = field(default_factory=list)
    docs: list[_Doc] = field(default_factory=list)
    policies: list[Policy] = field(default_factory=list)
    hashed: list[tuple[str, bytes]] = field(default_factory=list)
    crosswalk_files: list[str] = field(default_factory=list)  # watched for reloads too
    secret_values: set[str] = field(default_factory=set)

    def add(
        self,
        file: str,
        line: int | None,
        upstream: str | None,
        where: str | None,
        message: str,
        severity: Severity = "error",
    ) -> None:
        self.problems.append(Problem(file, line, upstream, where, message, severity))


def _policy_files(directory: Path) -> list[Path]:
    out = []
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith((".", "#")) or name.endswith("~"):
            continue  # hidden files, editor locks and backups
        if not name.endswith((".yaml", ".yml")):
            continue
        if entry.is_file():
            out.append(entry)
    return sorted(out, key=lambda p: p.name)


def _read_text(path: Path) -> tuple[bytes | None, str | None, str | None]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        return None, None, f"cannot read file: {exc.strerror or type(exc).__name__}"
    if len(data) > MAX_FILE_SIZE:
        return data, None, "file is larger than 16MiB"
    try:
        return data, data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return data, None, f"not UTF-8 text (byte {exc.start})"


def _documents(text: str, file: str, state: _State) -> list[tuple[Node, Any]]:
    """(node, plain data) per non-empty document; YAML errors become problems."""
    nodes: list[Node] = []
    loader: PolicyYamlLoader | None = None
    try:
        loader = PolicyYamlLoader(text)  # the reader already rejects control characters here
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                nodes.append(node)
    except yaml.YAMLError as exc:
        line, message = _yaml_error(exc, text)
        lines = text.splitlines()
        if line is not None and 0 < line <= len(lines) and re.match(r"\s*listen:\s*\[", lines[line - 1]):
            message += '; quote IPv6 addresses: listen: "[::1]:8101"'
        state.add(file, line, None, None, message)
    except RecursionError:
        state.add(file, None, None, None, "invalid YAML: nested too deeply")
    finally:
        if loader is not None:
            loader.dispose()

    out: list[tuple[Node, Any]] = []
    for node in nodes:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            continue  # an empty document
        walk = _inspect(node)
        if walk.recursive:
            state.add(file, _line(node), None, None, "recursive YAML alias (an anchor used inside itself)")
            continue
        if walk.too_big:
            state.add(
                file,
                _line(node),
                None,
                None,
                f"document too large: more than {MAX_VALUES_PER_DOCUMENT} values (after expanding aliases)",
            )
            continue
        upstream = _upstream_of_node(node)
        for path, line, first in walk.duplicates:
            state.add(file, line, upstream, _dotted(path), f"duplicate key (first given at line {first})")
        constructor = PolicyYamlLoader("")
        try:
            data = constructor.construct_document(node)
        except yaml.YAMLError as exc:
            line, message = _yaml_error(exc)
            state.add(file, line, upstream, None, message)
            continue
        finally:
            constructor.dispose()
        if data is None:
            continue
        out.append((node, data))
    return out


def _upstream_of_node(node: Node) -> str | None:
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "upstream" and isinstance(value, ScalarNode):
                name = str(value.value)
                if name and len(name) <= 63 and "${" not in name and name.isprintable():
                    return name
    return None


def _load_crosswalk(
    raw_item: dict[Any, Any], index: int, node: Node, file: str, upstream: str | None, state: _State
) -> None:
    """Replaces `crosswalk_file` in one raw failover entry by the file's mapping."""
    ref = raw_item.get("crosswalk_file")
    where = f"failover[{index}].crosswalk_file"
    line = _locate(node, ("failover", index, "crosswalk_file"))
    if "crosswalk" in raw_item:
        state.add(file, line, upstream, where, "give crosswalk or crosswalk_file, not both")
        return
    if not isinstance(ref, str) or not ref:
        return  # the schema reports the type
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(file).parent / path
    state.crosswalk_files.append(str(path))
    data, text, error = _read_text(path)
    if data is not None:
        state.hashed.append((str(path), data))
    if text is None:
        state.add(file, line, upstream, where, f"{ref}: {error}")
        return
    xfile = str(path)
    problems_before = len(state.problems)
    docs = _documents(text, xfile, state)
    if len(state.problems) > problems_before:
        return
    if len(docs) != 1 or not isinstance(docs[0][1], dict):
        state.add(file, line, upstream, where, f"{ref}: should hold one mapping (payment_methods:, templates:)")
        return
    xnode, xdata = docs[0]
    try:
        crosswalk = Crosswalk.model_validate(xdata, context=_CONTEXT)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            sub = _dotted(loc)
            state.add(
                xfile,
                _locate(xnode, loc),
                upstream,
                f"failover[{index}].crosswalk" + (f".{sub}" if sub else ""),
                _message(err, Crosswalk),
            )
        return
    raw_item["crosswalk"] = crosswalk.model_dump()


def _load_document(node: Node, data: Any, file: str, state: _State) -> None:
    if not isinstance(data, dict):
        state.add(
            file,
            _line(node),
            None,
            None,
            f"a policy document should be a mapping (upstream: NAME, target: URL, ...), got {_got(data)}",
        )
        return
    raw_name = data.get("upstream")
    upstream = raw_name if isinstance(raw_name, str) and raw_name and "${" not in raw_name else None
    if upstream is not None and (len(upstream) > 63 or not upstream.isprintable()):
        upstream = None
    base_dir = Path(file).parent

    # An unset secret reads as a stand-in, so that the field is judged by its other rules
    # and not reported twice (`client_id: should have at least 1 character`). It is never
    # served: strict loading (`run`, reloads) makes the unset secret an error, and lenient
    # loading is only `egressd check`'s.
    resolved, issues = resolve_tree(
        data, environ=state.environ, base_dir=base_dir, values=state.secret_values, missing=UNSET_SECRET
    )
    for issue in issues:
        severity: Severity = "error"
        message = issue.message
        if issue.kind == "missing" and state.secrets == "lenient":
            severity = "warning"
            message += " (an error for egressd run)"
        state.add(file, _locate(node, issue.path), upstream, _dotted(issue.path), message, severity)

    failover = resolved.get("failover")
    if isinstance(failover, list):
        for index, item in enumerate(failover):
            if isinstance(item, dict) and "crosswalk_file" in item:
                _load_crosswalk(item, index, node, file, upstream, state)

    doc = _Doc(file, node, _valid_name(resolved.get("upstream")), _port(resolved.get("listen")), [], None)
    if isinstance(failover, list):
        for index, item in enumerate(failover):
            if isinstance(item, dict) and isinstance(item.get("to"), str):
                doc.failover_to.append((index, item["to"]))
    state.docs.append(doc)

    try:
        policy = Policy.model_validate(resolved, context=_CONTEXT)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            state.add(file, _locate(node, loc), upstream, _dotted(loc), _message(err, Policy))
        return

    tls = policy.tls
    if not tls.verify:
        state.add(
            file,
            _locate(node, ("tls", "verify")),
            upstream,
            "tls.verify",
            "TLS certificate verification is off",
            "warning",
        )
    if tls.ca_file is not None:
        ca = Path(tls.ca_file).expanduser()
        if not ca.is_absolute():
            ca = base_dir / ca
        if not os.access(ca, os.R_OK) or not ca.is_file():
            severity = "warning" if state.secrets == "lenient" else "error"
            state.add(
                file,
                _locate(node, ("tls", "ca_file")),
                upstream,
                "tls.ca_file",
                f"cannot read CA file {tls.ca_file}",
                severity,
            )
    doc.policy = policy
    state.policies.append(policy)


def _valid_name(v: Any) -> str | None:
    return v if isinstance(v, str) and UPSTREAM_NAME_RE.fullmatch(v) else None


def _port(v: Any) -> int | None:
    if not isinstance(v, str):
        return None
    try:
        _, port = split_host_port(v)
    except ValueError:
        return None
    return int(port) if port.isascii() and port.isdigit() and int(port) <= 65535 else None


def _cross_check(state: _State) -> None:
    first_by_name: dict[str, _Doc] = {}
    for doc in state.docs:
        if doc.name is None:
            continue
        first = first_by_name.get(doc.name)
        if first is None:
            first_by_name[doc.name] = doc
        else:
            first_line = _locate(first.node, ("upstream",))
            state.add(
                doc.file,
                _locate(doc.node, ("upstream",)),
                doc.name,
                "upstream",
                f"duplicate upstream name (first defined at {first.file}:{first_line})",
            )

    ports: dict[int, _Doc] = {}
    for doc in state.docs:
        if not doc.port:  # None, or 0 (any free port) which may repeat
            continue
        owner = ports.get(doc.port)
        if owner is None:
            ports[doc.port] = doc
        else:
            state.add(
                doc.file,
                _locate(doc.node, ("listen",)),
                doc.name,
                "listen",
                f"port {doc.port} is already used by upstream {owner.name or '?'} "
                f"({owner.file}:{_locate(owner.node, ('listen',))})",
            )

    names = sorted(first_by_name)
    for doc in state.docs:
        for index, to in doc.failover_to:
            where = f"failover[{index}].to"
            line = _locate(doc.node, ("failover", index, "to"))
            if doc.name is not None and to == doc.name:
                state.add(doc.file, line, doc.name, where, "an upstream cannot fail over to itself")
            elif to not in first_by_name and UPSTREAM_NAME_RE.fullmatch(to):
                close = difflib.get_close_matches(to, names, n=1, cutoff=0.6)
                hint = f", did you mean '{close[0]}'?" if close else ""
                known = ", ".join(names) if len(names) <= 20 else f"{len(names)} upstreams"
                state.add(doc.file, line, doc.name, where, f"no upstream named '{to}'{hint} (known: {known})")

    _check_failover_plans(state, first_by_name)
    _check_webhooks(state)


# ---- failover plans that could never be used (contract 7.4, 7.7) -------------------------

FAILOVER_DOCS = "docs/providers.md"
_TITLES = {"stripe": "Stripe", "paypal": "PayPal", "sendgrid": "SendGrid", "mailgun": "Mailgun"}
_APP_CREDENTIALS = {
    "stripe": "the app's Stripe key",
    "paypal": "the app's PayPal token",
    "sendgrid": "the app's SendGrid key",
    "mailgun": "the app's Mailgun key",
}
# What to add, as YAML that can be pasted (a `${` inside a flow mapping must be quoted).
_AUTH_HINTS = {
    "stripe": 'auth: {bearer: "${env:STRIPE_SECRET_KEY}"}',
    "paypal": "auth: {oauth_client_credentials: {token_url: TARGET/v1/oauth2/token, "
    'client_id: "${env:PAYPAL_CLIENT_ID}", client_secret: "${env:PAYPAL_CLIENT_SECRET}"}}',
    "sendgrid": 'auth: {bearer: "${env:SENDGRID_API_KEY}"}',
    "mailgun": 'auth: {basic: {username: api, password: "${env:MAILGUN_API_KEY}"}}',
}


def _plugin_of(policy: Policy) -> ProviderPlugin | None:
    """The plugin the runtime would build for `policy` (proxy/runtime.py), or None when its
    provider is not installed (`run` reports that at start-up)."""
    try:
        return load_plugin(policy.provider.name, policy.provider.settings)
    except Exception:  # an unknown name, or a third-party plugin that fails to load
        return None


def _translatable_to(source: ProviderPlugin) -> list[str]:
    """Providers the installed plugins translate `source`'s calls into."""
    names = []
    for name, cls in available().items():
        try:
            if source.failover_to(cls({})) is not None:
                names.append(name)
        except Exception:
            continue
    return names


def _dedupes(policy: Policy, plugin: ProviderPlugin) -> bool:
    """Does the upstream deduplicate unsafe calls on a key egressd sends? The same answer
    as the runtime's `dedupes_on_key` (proxy/stages/idempotency.py) for a call with a key:
    `idempotency.upstream_dedupes` when set, else the plugin's word."""
    idem = policy.idempotency
    if idem is not None and idem.upstream_dedupes is not None:
        return idem.upstream_dedupes
    return plugin.idempotency_header is not None


def _check_failover_plans(state: _State, first_by_name: Mapping[str, _Doc]) -> None:
    """Errors for failover rules the runtime would refuse on every call (the pair has no
    translator, the fallback has no auth, or lacks a setting its provider needs), found
    with the same lookups as proxy/stages/failover.py; a warning for a rule listing 5xx
    statuses on an upstream whose sends a 5xx leaves ambiguous, with no circuit breaker."""
    for doc in state.docs:
        policy = doc.policy
        if policy is None or doc.name is None:
            continue  # its own errors are reported
        source = _plugin_of(policy)
        for index, rule in enumerate(policy.failover):
            if source is not None:
                _check_failover_rule(state, doc, policy, source, index, rule.to, first_by_name)
            statuses = [v for v in rule.on if isinstance(v, int) and 500 <= v <= 599]
            if source is None or not statuses or policy.circuit_breaker is not None or _dedupes(policy, source):
                continue
            name = policy.provider.name
            idem = policy.idempotency
            if idem is not None and idem.upstream_dedupes is False:
                who = f"upstream {doc.name} (idempotency.upstream_dedupes: false)"
            else:
                who = _TITLES.get(name) or f"upstream {doc.name} ({name}, without idempotency.upstream_dedupes: true)"
            shown = ", ".join(str(v) for v in statuses)
            state.add(
                doc.file,
                _locate(doc.node, ("failover", index, "on")),
                doc.name,
                f"failover[{index}].on",
                f"{shown} never fails a send over: {who} does not deduplicate sends on a key, so a send "
                f"answered {statuses[0]} may have gone out and egressd refuses its failover (reason=ambiguous); "
                f"add a circuit_breaker block: sends then fail over once it opens (circuit_open) ({FAILOVER_DOCS})",
                "warning",
            )


def _check_failover_rule(
    state: _State,
    doc: _Doc,
    policy: Policy,
    source: ProviderPlugin,
    index: int,
    to: str,
    first_by_name: Mapping[str, _Doc],
) -> None:
    fallback = first_by_name.get(to)
    if fallback is None or to == doc.name or fallback.policy is None:
        return  # reported already: no such upstream, itself, or its own errors
    target_plugin = _plugin_of(fallback.policy)
    if target_plugin is None:
        return
    line = _locate(doc.node, ("failover", index, "to"))
    where = f"failover[{index}].to"
    src, dst = policy.provider.name, fallback.policy.provider.name
    if source.failover_to(target_plugin) is None:
        targets = _translatable_to(source)
        if targets:
            kinds = " or ".join(targets)
            advice = f"{src} calls fail over only to a {kinds} upstream: name one in to: or remove this rule"
        else:
            advice = f"{src} calls can fail over to no provider: remove this rule"
        state.add(
            doc.file,
            line,
            doc.name,
            where,
            f"fallback upstream '{to}' is a {dst} upstream and no installed plugin translates {src} calls "
            f"into {dst} calls: every failover to it would be refused (no_translation); {advice} ({FAILOVER_DOCS})",
        )
        return
    defined = f"upstream {to} at {fallback.file}:{_locate(fallback.node, ('upstream',))}"
    if fallback.policy.auth is None:
        credentials = _APP_CREDENTIALS.get(src, f"the credentials the app sends to {doc.name}")
        hint = _AUTH_HINTS.get(dst, "an auth block (bearer, basic, header or oauth_client_credentials)")
        hint = hint.replace("TARGET", fallback.policy.target)
        state.add(
            doc.file,
            line,
            doc.name,
            where,
            f"fallback upstream '{to}' has no auth block: egressd cannot call it with {credentials}; "
            f"add {hint} to {defined} ({FAILOVER_DOCS})",
        )
    for problem in target_plugin.fallback_problems():
        state.add(doc.file, line, doc.name, where, f"fallback upstream '{to}' {problem} in {defined} ({FAILOVER_DOCS})")


# ---- webhooks (contract 7.5, docs/webhooks.md) --------------------------------------------

WEBHOOK_DOCS = "docs/webhooks.md"
#: What each provider's scheme needs in the webhooks block: (field, why).
_WEBHOOK_NEEDS = {
    "stripe": (("secret", "the endpoint's signing secret (whsec_...) from Stripe's dashboard"),),
    "mailgun": (("secret", "the HTTP webhook signing key from Mailgun's dashboard"),),
    "sendgrid": (("public_key", "the Signed Event Webhook public key from SendGrid's settings"),),
    "paypal": (("webhook_id", "the id of the webhook subscription in PayPal's dashboard"),),
}
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _has_webhooks(plugin: ProviderPlugin) -> bool:
    return type(plugin).verify_webhook is not ProviderPlugin.verify_webhook


def _check_webhooks(state: _State) -> None:
    """Errors for a webhooks block that could never verify (a provider without webhook
    support, the secret its scheme needs missing, PayPal without auth for its verify API,
    bad SendGrid keys, events with nowhere to go); a warning for a deliver_to off loopback."""
    fallbacks = {rule.to for doc in state.docs if doc.policy is not None for rule in doc.policy.failover}
    for doc in state.docs:
        policy = doc.policy
        hooks = policy.webhooks if policy is not None else None
        if policy is None or hooks is None or doc.name is None:
            continue
        plugin = _plugin_of(policy)
        if plugin is None:
            continue
        name = policy.provider.name

        def add(key: str | None, message: str, severity: Severity = "error", doc: _Doc = doc) -> None:
            loc: tuple[str, ...] = ("webhooks", key) if key else ("webhooks",)
            where = "webhooks" + (f".{key}" if key else "")
            state.add(doc.file, _locate(doc.node, loc), doc.name, where, message, severity)

        if not _has_webhooks(plugin):
            known = ", ".join(sorted(n for n, cls in available().items() if _has_webhooks(cls({}))))
            add(None, f"provider {name} has no webhook support (providers with webhooks: {known}) ({WEBHOOK_DOCS})")
            continue
        for key, why in _WEBHOOK_NEEDS.get(name, ()):
            if getattr(hooks, key) is None:
                add(key, f"required for {_TITLES.get(name, name)} webhooks: {why} ({WEBHOOK_DOCS})")
        if name == "paypal" and policy.auth is None:
            add(
                "webhook_id",
                "PayPal webhooks are verified with PayPal's verify-webhook-signature API, called through this "
                f"upstream with its auth: add {_AUTH_HINTS['paypal'].replace('TARGET', policy.target)} "
                f"({WEBHOOK_DOCS})",
            )
        if name == "sendgrid":
            from plugins.webhooks_sendgrid import key_problem

            signing = hooks.signing_key.get_secret_value() if hooks.signing_key is not None else None
            if hooks.public_key is not None and hooks.public_key != UNSET_SECRET:
                problem = key_problem(public_key=hooks.public_key)
                if problem:
                    add("public_key", problem)
            if signing is not None and signing != UNSET_SECRET:
                problem = key_problem(signing_key=signing)
                if problem:
                    add("signing_key", problem)
        if hooks.deliver_to is None:
            if doc.name not in fallbacks:
                add(
                    "deliver_to",
                    "required: the app's endpoint for these events (it may be left out only on a failover "
                    "fallback, whose translated events go to the primary's deliver_to)",
                )
        else:
            host = (urlsplit(hooks.deliver_to).hostname or "").lower()
            if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
                add(
                    "deliver_to",
                    f"delivers to {host}, off this host: verified events leave egressd over the network "
                    "(fine for an app behind a Service; check that the URL is the app's own endpoint)",
                    "warning",
                )


def _scrub(problem: Problem, secrets: set[str]) -> Problem:
    """Belt and braces: no substituted secret value may appear in a message."""
    message = problem.message
    for value in sorted(secrets, key=len, reverse=True):
        if len(value) >= 3 and value in message:
            message = message.replace(value, "***")
    message = _one_line(message)
    if message == problem.message:
        return problem
    return Problem(problem.file, problem.line, problem.upstream, problem.field, message, problem.severity)


def load_policy_dir(
    directory: str | Path,
    *,
    secrets: Literal["strict", "lenient"] = "strict",
    environ: Mapping[str, str] | None = None,
) -> LoadResult:
    """Loads and validates every policy file of `directory`. Never raises.

    `secrets="lenient"` (for `egressd check`) turns unset `${env:}` variables and
    unreadable `${file:}` secrets into warnings, so a set can be checked without them.
    """
    state = _State(secrets=secrets, environ=environ)
    files: list[str] = []
    try:
        _load(Path(directory), state, files)
    except RecursionError:
        state.add(str(directory), None, None, None, "a policy is nested too deeply")
    except Exception as exc:  # never a traceback for the operator
        state.add(str(directory), None, None, None, f"internal error while loading: {type(exc).__name__}: {exc}")

    rank: dict[str, int] = {}
    for p in state.problems:
        rank.setdefault(p.file, len(rank))
    ordered = sorted(state.problems, key=lambda p: (rank[p.file], p.line or 0))
    problems = tuple(_scrub(p, state.secret_values) for p in ordered)
    if any(p.severity == "error" for p in problems):
        return LoadResult(None, problems)
    digest = hashlib.sha256()
    for name, data in state.hashed:
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    policy_set = PolicySet(
        policies=tuple(state.policies),
        version=digest.hexdigest()[:12],
        files=tuple(files),
        crosswalk_files=tuple(dict.fromkeys(state.crosswalk_files)),
    )
    return LoadResult(policy_set, problems)


def _load(directory: Path, state: _State, files: list[str]) -> None:
    where = str(directory)
    if not directory.exists():
        state.add(where, None, None, None, "no such policy directory")
        return
    if not directory.is_dir():
        state.add(where, None, None, None, "not a directory")
        return
    try:
        paths = _policy_files(directory)
    except OSError as exc:
        state.add(where, None, None, None, f"cannot list directory: {exc.strerror or type(exc).__name__}")
        return
    if not paths:
        state.add(where, None, None, None, "no policy files (*.yaml, *.yml) in this directory")
        return
    for path in paths:
        file = str(path)
        files.append(file)
        data, text, error = _read_text(path)
        if data is not None:
            state.hashed.append((path.name, data))
        if text is None:
            state.add(file, None, None, None, error or "cannot read file")
            continue
        for node, doc in _documents(text, file, state):
            try:
                _load_document(node, doc, file, state)
            except RecursionError:
                state.add(file, _line(node), None, None, "document is nested too deeply")
    if not state.docs and not any(p.severity == "error" for p in state.problems):
        state.add(where, None, None, None, "no upstreams defined (every policy file is empty)")
        return
    _cross_check(state)
