"""Redaction of secrets in everything aitrain records or prints.

One rule set, used for MLflow params and tags, env documents, the recorded
command line and every env printed on the console (the dry run too):

* a value whose *name* looks secret becomes ``***``. A name looks secret when it
  contains ``PASSWORD``, ``PASSWD``, ``SECRET`` or ``CREDENTIAL``, or when one of
  its words (split at ``_ . - /``, spaces and camelCase) is ``TOKEN``, ``KEY`` or a
  compound such as ``APIKEY`` / ``ACCESSKEY`` (case-insensitive). Words, not
  substrings, for TOKEN and KEY: ``tokenizer``, ``tokens_per_s`` and
  ``NCCL_IB_PKEY`` are not secrets, ``HF_TOKEN``, ``apiKey`` and ``AWS_SECRET_ACCESS_KEY`` are;
* credentials in URIs, ``scheme://user:pass@host`` (or ``scheme://token@host``),
  become ``scheme://***@host``;
* in free text (a command line), ``NAME=value`` and ``--name value`` pairs with a
  secret-looking name have their value replaced.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_SUBSTRINGS = ("password", "passwd", "secret", "credential")
_WORDS = {
    "token", "key", "apikey", "accesskey", "secretkey", "privatekey", "sshkey", "authkey",
    "authtoken", "accesstoken", "refreshtoken", "bearertoken", "sessiontoken", "idtoken",
}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[^A-Za-z0-9]+")
_URI_CREDS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s/@:'\"]+(?::[^\s/@'\"]*)?)@")
# NAME=value inside free text (a command line, a query string); the value ends at whitespace or & ; , quotes.
_ASSIGN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>=)(?P<value>[^\s&;,'\"]+)")


def words(name: str) -> list[str]:
    """``awsSecretAccessKey`` -> ['aws', 'secret', 'access', 'key']; ``HF_TOKEN`` -> ['hf', 'token']."""
    out: list[str] = []
    for part in _SPLIT.split(name):
        out.extend(w.lower() for w in _CAMEL.split(part) if w)
    return out


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    if any(s in lowered for s in _SUBSTRINGS):
        return True
    return any(w in _WORDS for w in words(name))


def redact_uri(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x`` (anywhere in ``text``)."""
    return _URI_CREDS.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def redact_value(name: str, value: Any) -> Any:
    """The value to record for ``name``: masked when the name looks secret, URI credentials removed."""
    if is_secret_name(name):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Free text: URI credentials and ``SECRET_NAME=value`` pairs."""
    text = redact_uri(text)

    def assign(m: re.Match[str]) -> str:
        name = m.group("name")
        return f"{name}={MASK}" if is_secret_name(name) else m.group(0)

    return _ASSIGN.sub(assign, text)


def redact_mapping(d: dict[str, Any]) -> dict[str, Any]:
    """A flat mapping (env, params, tags): each value redacted by its own name."""
    return {k: redact_value(k, v) for k, v in d.items()}


def redact_obj(obj: Any, name: str = "") -> Any:
    """A JSON-like document, recursively: dict keys name their values."""
    if name and is_secret_name(name) and not isinstance(obj, (dict, list, tuple)):
        return MASK
    if isinstance(obj, dict):
        if name and is_secret_name(name):
            # {"HF_TOKEN": {"value": "...", "source": "user-set"}}: mask the value, keep the rest.
            if "value" in obj:
                return {k: MASK if k == "value" else redact_obj(v, str(k)) for k, v in obj.items()}
            return {k: redact_obj(v, name) if isinstance(v, (dict, list)) else MASK for k, v in obj.items()}
        # {"name": "HF_TOKEN", "value": "..."} style records: the sibling "name" names the value.
        named = obj.get("name") if isinstance(obj.get("name"), str) else None
        out = {}
        for k, v in obj.items():
            key = str(k)
            if named and key == "value" and is_secret_name(named):
                out[k] = MASK
            else:
                out[k] = redact_obj(v, key)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, name) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line: ``key=value`` overrides, ``--password=x`` and ``--password x``."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        if arg.startswith("-") and "=" not in arg and is_secret_name(arg.lstrip("-")):
            out.append(arg)
            mask_next = True
            continue
        key, sep, value = arg.partition("=")
        if sep and is_secret_name(key.lstrip("-+~")):
            out.append(f"{key}={MASK}")
        else:
            out.append(redact_text(arg))
    return out
