"""Request targets and paths: what meter forwards, and what it classifies.

Pure functions on strings, no I/O.  `origin_form` decides which path and query a
request target stands for on the configured upstream (RFC 9112 §3.2), so that
no target can name another host; `normalised_path` is the path meter classifies
(RFC 3986 §6.2.2), while the path as sent is what is forwarded.
"""

from __future__ import annotations

import re

_ABSOLUTE_SCHEMES = ("http", "https")
_AUTHORITY_END = re.compile(r"[/?#]")
_PERCENT_TRIPLET = re.compile(r"%([0-9A-Fa-f]{2})")
# RFC 3986 §2.3: the characters whose percent-encoding means the character itself.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def origin_form(target: str) -> str | None:
    """The path and query on the upstream that a request target asks for, or None.

    Origin form (`/path?q`) is returned as is.  Absolute form (`http://host/path?q`,
    which RFC 9112 §3.2.2 requires a server to accept) loses its scheme and
    authority: the host it names is never contacted.  Authority form
    (`host:port`, CONNECT's), asterisk form (`*`) and anything else name no
    resource on the upstream: None.
    """
    if target.startswith("/"):
        return target
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in _ABSOLUTE_SCHEMES:
        return None
    end = _AUTHORITY_END.search(rest)
    if end is None:
        return "/" if rest else None
    if end.start() == 0:
        return None  # `http:///x`: no authority, not an absolute URI
    tail = rest[end.start() :]
    return tail if tail[0] == "/" else "/" + tail


def target_for_record(target: str) -> str:
    """A refused target as the ledger may keep it: no query, no userinfo (either may
    carry credentials)."""
    target = target.split("?", 1)[0]
    return target.rpartition("@")[2]


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for a path that starts with `/`."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/" + "/".join(out)
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"  # `/a/b/..` is the directory `/a/`
    return result


def normalised_path(path: str) -> str:
    """The path as the upstream will understand it (RFC 3986 §6.2.2): percent-encoded
    unreserved characters decoded, dot segments removed.  `path` starts with `/` and
    has no query.  Most paths have neither, and come back as they are at the cost of
    two scans."""
    if "%" in path:
        path = _PERCENT_TRIPLET.sub(_decode_unreserved, path)
    elif "/." not in path:
        return path
    if "/." in path:
        path = _remove_dot_segments(path)
    return path
