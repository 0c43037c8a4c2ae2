"""Credentials kept out of every file and log line: storage options and URLs as they are saved.

``redact`` replaces the value of each secret option (by its name, or by what the value looks like)
with ``MARKER``, anywhere in nested options (``client_kwargs.headers.Authorization``); the options
that say where and how to read (``endpoint_url``, ``anon``, ``profile``, ``block_size`` ...) stay,
so the saved config still tells which store was read. ``redact_url`` does the same for a URL's
user and password and its signed query parameters, and ``redact_text`` for every URL in a message.

The real options live in memory only: the job takes them from its config on every rank, and a
process that reads an input without its config (the report's pictures, ``verify --recount``)
finds them with ``live_options``, registered by the command that was given them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MARKER = "<redacted>"
"""What a secret value is saved as."""

SECRET_NAMES = frozenset({
    "key", "secret", "token", "password", "passwd", "pwd", "auth", "authorization", "cookie",
    "setcookie", "credential", "credentials", "sig", "signature", "connectionstring", "sastoken",
    "accountkey", "clientsecret", "sessiontoken", "securitytoken", "accesstoken", "refreshtoken",
    "idtoken", "apikey", "privatekey", "privatekeyid", "secretkey", "accesskey", "accesskeyid",
    "secretaccesskey", "awsaccesskeyid", "awssecretaccesskey", "awssessiontoken", "xamzsecuritytoken",
    "xamzcredential", "xamzsignature", "xgoogcredential", "xgoogsignature", "xapikey",
    "proxyauthorization", "code",
})
"""Option, header and query-parameter names whose value is a credential (compared lowercase,
without ``-`` and ``_``: ``client_secret``, ``Client-Secret`` and ``clientsecret`` are one)."""
SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "signature", "apikey",
                "accesskey", "accountkey", "privatekey", "connectionstring", "auth", "cookie")
"""A name holding one of these is a secret's too (``aws_secret_access_key``, ``hf_token``)."""
NOT_SECRET = frozenset({"anon", "google_default", "cloud", "browser", "cache"})
"""Values of ``token`` (gcsfs) that name a way to find credentials, not a credential."""

_SECRET_VALUE = re.compile(
    r"^\s*(bearer|basic|digest|token|aws4-hmac-sha256|goog4-rsa-sha256|sharedaccesssignature)\s"
    r"|(accountkey|sharedaccesssignature|sharedaccesskey|password|pwd)\s*="
    r"|-----begin [a-z ]*private key-----",
    re.IGNORECASE)
_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
"""Values that are credentials whatever their option's name: an Authorization header's value, an
Azure connection string, a PEM private key, an AWS access key id."""
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_secret_name(name: object) -> bool:
    """Whether an option, header or query parameter of this name holds a credential."""
    if not isinstance(name, str):
        return False
    plain = _plain(name)
    return plain in SECRET_NAMES or plain.endswith("key") or any(part in plain for part in SECRET_PARTS)


def is_secret_value(value: object) -> bool:
    """Whether a string is a credential by its look (whatever it is named)."""
    return isinstance(value, str) and (_SECRET_VALUE.search(value) is not None
                                       or _ACCESS_KEY_ID.search(value) is not None)


def redact(options: Any) -> Any:
    """``options`` with every credential replaced by MARKER, recursively; a new structure (the
    one given is left as it is). Strings that are URLs lose their user, password and signed
    query parameters (``redact_url``)."""
    return _redact(options, secret=False)


def _redact(value: Any, secret: bool) -> Any:
    if isinstance(value, dict):
        return {key: _redact(item, secret or is_secret_name(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(item, secret) for item in value)
    if value is None or isinstance(value, bool):
        return value  # carries no credential (``token: null``, ``anon: true``)
    if secret and not (isinstance(value, str) and value in NOT_SECRET):
        return MARKER
    if isinstance(value, str):
        return MARKER if is_secret_value(value) else redact_url(value)
    return value


def redact_url(text: str) -> str:
    """A URL without its credentials: user and password (``https://<redacted>@host/``) and the
    values of signed query parameters (``?sig=<redacted>``, ``X-Amz-Signature=<redacted>``).
    Anything that is not a URL with credentials comes back unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MARKER}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(name) or is_secret_value(value) for name, value in pairs):
            query = "&".join(
                f"{quote(name, safe='-_.')}={MARKER if is_secret_name(name) or is_secret_value(value) else quote(value, safe='-_.:/')}"  # noqa: E501
                for name, value in pairs)
    if netloc == parts.netloc and query == parts.query:
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def signed_query(url: str) -> bool:
    """Whether a URL's query carries credentials (a presigned URL's signature, a SAS token, an
    access token): unlike a password in the host part, they name this one object and cannot be
    kept apart from it, so an input naming them would save them with its listing and rows."""
    if not isinstance(url, str) or "://" not in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    host = parts.netloc.rsplit("@", 1)[-1]  # a password there is kept in memory, not in the listing
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bool(parts.query) and redact_url(bare) != bare


def redact_text(text: str, options: Any = None) -> str:
    """A message with every URL in it redacted, and any secret value of ``options`` or of the
    options this process was given (``keep_live``) that it quotes replaced by MARKER."""
    text = _ACCESS_KEY_ID.sub(MARKER, _URL.sub(lambda found: redact_url(found.group(0)), str(text)))
    with _LOCK:
        known = [options, *_LIVE.values()]
    for value in sorted(set(secret_values(known)), key=len, reverse=True):
        text = text.replace(value, MARKER)
    return text


def redact_config(values: Any) -> Any:
    """A job spec as a dict, as it is saved: every ``storage_options`` section redacted, and
    every URL in it without its credentials."""
    if isinstance(values, dict):
        return {key: redact(item) if key == "storage_options" else redact_config(item)
                for key, item in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(redact_config(item) for item in values)
    return redact_url(values) if isinstance(values, str) else values


def secret_values(options: Any, secret: bool = False) -> list[str]:
    """The credential strings in ``options`` (what ``redact`` replaces), at least 4 characters long."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, item in options.items():
            found += secret_values(item, secret or is_secret_name(key))
    elif isinstance(options, (list, tuple)):
        for item in options:
            found += secret_values(item, secret)
    elif isinstance(options, str) and len(options) >= 4 and options not in NOT_SECRET and (
            secret or is_secret_value(options)):
        found.append(options)
    return found


def restore_url(saved: str, live: str | None) -> str:
    """``saved`` (a redacted URL) with the user and password of ``live`` (the URL as configured)
    where both name the same host; else ``saved`` as it is."""
    if not live or MARKER not in saved or "://" not in saved or "://" not in live:
        return saved
    old, new = urlsplit(saved), urlsplit(live)
    if old.scheme != new.scheme or old.netloc.rsplit("@", 1)[-1] != new.netloc.rsplit("@", 1)[-1]:
        return saved
    return urlunsplit((old.scheme, new.netloc, old.path, old.query, old.fragment))


def is_redacted(value: Any) -> bool:
    """Whether ``value`` (options, a URL) holds MARKER anywhere: a saved copy, not the real thing."""
    if isinstance(value, dict):
        return any(is_redacted(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(is_redacted(item) for item in value)
    return isinstance(value, str) and MARKER in value


# ------------------------------------------------------------ the real options, in memory only

_LIVE: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()


def _location(url: str) -> str:
    """``scheme://host`` of a URL (its bucket, container or server), without credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rsplit('@', 1)[-1].lower()}"


def keep_live(url: str, options: dict[str, Any] | None) -> None:
    """Remember, in this process only, the options given for the store of ``url`` (its bucket)."""
    if options and "://" in str(url):
        with _LOCK:
            _LIVE[_location(url)] = dict(options)


def live_options(url: str) -> dict[str, Any] | None:
    """The options this process was given for the store of ``url``, or None."""
    if "://" not in str(url):
        return None
    with _LOCK:
        found = _LIVE.get(_location(url))
    return dict(found) if found is not None else None


# ------------------------------------------------------------ log lines and tracebacks


class RedactingFilter(logging.Filter):
    """Log records with their message (and traceback) passed through ``redact_text``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def redact_logs() -> None:
    """Every handler of the root logger, and the traceback of an uncaught exception, redacted."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if not getattr(sys.excepthook, "redacting", False):
        sys.excepthook = _redacted_hook


def _redacted_hook(kind, error, trace) -> None:
    import traceback

    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, error, trace))))


_redacted_hook.redacting = True  # type: ignore[attr-defined]
