"""Form encodings: Stripe's bracketed form bodies and multipart/form-data (Mailgun)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

_KEY_RE = re.compile(r"\[([^\[\]]*)\]")


def parse_stripe_form(text: str) -> dict[str, Any]:
    """`a[b][0]=x&c[]=y` -> {"a": {"b": ["x"]}, "c": ["y"]}; accepts indexed and `[]` arrays."""
    root: dict[str, Any] = {}
    for raw_key, value in parse_qsl(text, keep_blank_values=True):
        head = raw_key.split("[", 1)[0]
        parts = [head, *_KEY_RE.findall(raw_key[len(head) :])]
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if part == "" or (part.isdigit() and int(part) >= len(node)):
                    if last:
                        node.append(value)
                        break
                    node.append({} if not (parts[i + 1] == "" or parts[i + 1].isdigit()) else [])
                    node = node[-1]
                    continue
                idx = int(part) if part.isdigit() else len(node) - 1
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
                continue
            if last:
                node[part] = value
            else:
                nxt = parts[i + 1]
                if part not in node or not isinstance(node[part], dict | list):
                    node[part] = [] if (nxt == "" or nxt.isdigit()) else {}
                node = node[part]
    return root


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}[{k}]" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    elif isinstance(value, bool):
        out.append((prefix, "true" if value else "false"))
    else:
        out.append((prefix, str(value)))


def encode_stripe_form(params: Mapping[str, Any]) -> bytes:
    """The inverse of `parse_stripe_form`, the way the official SDK encodes (indexed arrays)."""
    pairs: list[tuple[str, str]] = []
    _flatten("", params, pairs)
    return urlencode(pairs, safe="[]").encode()


@dataclass(frozen=True, slots=True)
class FilePart:
    name: str  # the form field (attachment / inline)
    filename: str
    content_type: str
    data: bytes


def encode_multipart(fields: Iterable[tuple[str, str]], files: Iterable[FilePart] = ()) -> tuple[bytes, str]:
    """(body, content type). The boundary is derived from the content (deterministic)."""
    fields = list(fields)
    files = list(files)
    h = hashlib.sha256()
    for k, v in fields:
        h.update(k.encode() + b"\0" + v.encode() + b"\0")
    for f in files:
        h.update(f.filename.encode() + b"\0" + f.data)
    boundary = "egressd" + h.hexdigest()[:32]
    out: list[bytes] = []
    for k, v in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_q(k)}"\r\n\r\n'.encode())
        out.append(v.encode() + b"\r\n")
    for f in files:
        out.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{_q(f.name)}"; '
                f'filename="{_q(f.filename)}"\r\nContent-Type: {f.content_type or "application/octet-stream"}\r\n\r\n'
            ).encode()
        )
        out.append(f.data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def _q(text: str) -> str:
    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


def parse_form(body: bytes, content_type: str) -> tuple[list[tuple[str, str]], list[FilePart]]:
    """A urlencoded or multipart/form-data body -> (fields in order, files)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
        )
        fields: list[tuple[str, str]] = []
        files: list[FilePart] = []
        if not msg.is_multipart():
            return fields, files
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str):
                continue
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            if filename is not None:
                files.append(FilePart(name, filename, part.get_content_type(), data))
            else:
                charset = part.get_content_charset() or "utf-8"
                fields.append((name, data.decode(charset, "replace")))
        return fields, files
    return parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True), []
