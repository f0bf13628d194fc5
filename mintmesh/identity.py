"""Adapter names and references.

Name: ``tenant/name``. Reference: ``tenant/name`` (= ``@latest``), ``tenant/name@7`` (a revision)
or ``tenant/name@prod`` (an alias). Tenants and names are lowercase-friendly identifiers:
letters, digits, ``-``, ``_`` and ``.``; 1-64 characters; not starting with ``.`` or ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mintmesh.errors import InvalidArgument

_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}"
_PART_RE = re.compile(rf"^{_PART}$")
_REF_RE = re.compile(rf"^(?P<tenant>{_PART})/(?P<name>{_PART})(?:@(?P<sel>{_PART}))?$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str
    # None = latest; an int = a revision; a str = an alias.
    selector: int | str | None = None

    @property
    def full_name(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def revision(self) -> int | None:
        return self.selector if isinstance(self.selector, int) else None

    @property
    def alias(self) -> str | None:
        if self.selector is None:
            return "latest"
        return self.selector if isinstance(self.selector, str) else None

    def __str__(self) -> str:
        if self.selector is None:
            return self.full_name
        return f"{self.full_name}@{self.selector}"


# Revisions are uint32 on the wire.
MAX_REVISION = 2**32 - 1
QUOTE_CHARS = 80


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value) for an error message, cut to a short prefix: a message never echoes a huge
    input whole (a status over the metadata limit reaches the client as another error)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def parse_ref(ref: str) -> AdapterRef:
    """Parse ``tenant/name[@rev|@alias]``; raise InvalidArgument naming the bad reference."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("adapter reference is empty; expected 'tenant/name[@revision]'")
    m = _REF_RE.match(ref)
    if not m:
        raise InvalidArgument(
            f"adapter reference {quote(ref)} is malformed; expected 'tenant/name', "
            "'tenant/name@7' or 'tenant/name@alias'"
        )
    sel_text = m.group("sel")
    selector: int | str | None
    if sel_text is None:
        selector = None
    elif sel_text.isdigit():
        selector = int(sel_text) if len(sel_text) <= 10 else MAX_REVISION + 1
        if not 1 <= selector <= MAX_REVISION:
            raise InvalidArgument(
                f"revision {quote(sel_text)} in {quote(ref)} must be in [1, {MAX_REVISION}]"
            )
    else:
        selector = sel_text
    return AdapterRef(m.group("tenant"), m.group("name"), selector)


def parse_name(name: str) -> AdapterRef:
    """Parse ``tenant/name`` (no selector allowed)."""
    ref = parse_ref(name)
    if ref.selector is not None:
        raise InvalidArgument(f"adapter name {name!r} must not carry '@{ref.selector}'")
    return ref


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidArgument(f"digest {digest!r} is not a lowercase hex sha256 (64 characters)")
    return digest


def check_part(kind: str, value: str) -> str:
    if not _PART_RE.match(value or ""):
        raise InvalidArgument(f"{kind} {value!r} is malformed")
    return value
