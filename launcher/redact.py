"""Redaction of secrets in everything aitrain records or prints.

One rule set, used for MLflow params and tags, env documents, the recorded
command line, every file that holds the config (``job.yaml``, Hydra's ``.hydra/*.yaml``,
``tracking.json``) and everything printed on the console (the dry run too):

* a value whose *name* looks secret becomes ``***``. A name looks secret when it
  contains ``PASSWORD``, ``PASSWD``, ``SECRET`` or ``CREDENTIAL``, or when one of
  its words (split at ``_ . - /``, spaces and camelCase) is ``TOKEN``, ``KEY`` or a
  compound such as ``APIKEY`` / ``ACCESSKEY`` (case-insensitive). Words, not
  substrings, for TOKEN and KEY: ``tokenizer``, ``tokens_per_s`` and
  ``NCCL_IB_PKEY`` are not secrets, ``HF_TOKEN``, ``apiKey`` and ``AWS_SECRET_ACCESS_KEY`` are;
* credentials in URIs, ``scheme://user:pass@host`` (or ``scheme://token@host``),
  become ``scheme://***@host``;
* in free text (a command line), ``NAME=value`` and ``--name value`` pairs with a
  secret-looking name have their value replaced; in a list of strings (an argv, a
  program's ``script_args``) the item after a secret-looking ``--flag`` too.

Every pattern here runs in time linear in the text (a name or scheme starts only where a
run of name characters starts), so a 100,000-character value costs milliseconds.

Secrets a re-run of the job needs (an sbatch script, a Ray Jobs API entrypoint) never go in
the script: :func:`split_secrets` gives the command with ``***`` in their place and the values
to pass in the environment of the submission (:data:`SECRET_ARGS_ENV`);
:func:`restore_secrets` puts them back where the re-run starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

MASK = "***"

_SUBSTRINGS = ("password", "passwd", "secret", "credential")
_WORDS = {
    "token", "key", "apikey", "accesskey", "secretkey", "privatekey", "sshkey", "authkey",
    "authtoken", "accesstoken", "refreshtoken", "bearertoken", "sessiontoken", "idtoken",
}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[^A-Za-z0-9]+")
# The lookbehinds make each match start where a run of scheme (name) characters starts, so no
# position is scanned from more than once: `\b` alone let every `.`/`-` restart the scan
# (quadratic: a 40,000-character value took 34 s).
_URI_CREDS = re.compile(r"(?<![A-Za-z0-9+.\-])([0-9+.\-]*[A-Za-z][A-Za-z0-9+.\-]*://)([^\s/@:'\"]+(?::[^\s/@'\"]*)?)@")
# NAME=value inside free text (a command line, a query string); the value ends at whitespace or & ; , quotes.
_ASSIGN = re.compile(r"(?<![A-Za-z0-9_.\-])(?P<pre>[0-9.\-]*)(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>=)"
                     r"(?P<value>[^\s&;,'\"]+)")
# --name value (or '--name','value' inside a Hydra list) in free text; a value is not another flag.
_FLAG = re.compile(r"(?<![A-Za-z0-9_.\-])(?P<flag>--?[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>['\"]?(?:\s*,\s*|\s+)['\"]?)"
                   r"(?P<value>[^\s&;,'\"\]\)\-][^\s&;,'\"\]\)]*)")
# The environment variable that carries a re-run's secret arguments (see split_secrets).
SECRET_ARGS_ENV = "AITRAIN_SECRET_ARGS"


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
    if "key" not in lowered and "token" not in lowered:  # every word in _WORDS has one of them
        return False
    return any(w in _WORDS for w in words(name))


def redact_uri(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://***@host/x`` (anywhere in ``text``)."""
    return _URI_CREDS.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def strip_uri_credentials(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://host/x`` (a link to open; the browser asks)."""
    return _URI_CREDS.sub(lambda m: m.group(1), text)


def redact_value(name: str, value: Any) -> Any:
    """The value to record for ``name``: masked when the name looks secret, URI credentials removed."""
    if is_secret_name(name):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Free text: URI credentials, ``SECRET_NAME=value`` and ``--secret-name value`` pairs."""
    text = redact_uri(text)

    def assign(m: re.Match[str]) -> str:
        return f"{m.group('pre')}{m.group('name')}={MASK}" if is_secret_name(m.group("name")) else m.group(0)

    def flag(m: re.Match[str]) -> str:
        return f"{m.group('flag')}{m.group('sep')}{MASK}" if is_secret_name(m.group("flag")) else m.group(0)

    return _FLAG.sub(flag, _ASSIGN.sub(assign, text))


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
        if obj and all(isinstance(v, str) for v in obj):  # an argv: `--token`, `abc` masks abc
            return redact_argv(list(obj))
        return [redact_obj(v, name) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line: ``key=value`` overrides, ``--password=x`` and ``--password x``."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next and not arg.startswith("--"):  # `--use-token --lr 1`: a flag, not its value
            out.append(MASK)
            mask_next = False
            continue
        mask_next = False
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


def split_secrets(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(``argv`` as :func:`redact_argv` shows it, the environment that carries what it masked).

    For a command that is written down or shown (an sbatch script, a Ray Jobs API
    entrypoint) but must run with the real values: the submission passes the environment,
    and :func:`restore_secrets` in the re-run puts each value back. Empty when nothing was
    masked."""
    masked = redact_argv(list(argv))
    pairs = [[m, a] for m, a in zip(masked, argv, strict=True) if m != a]
    return masked, ({SECRET_ARGS_ENV: json.dumps(pairs)} if pairs else {})


def restore_secrets(argv: Sequence[str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """``argv`` with the values :func:`split_secrets` masked put back, from :data:`SECRET_ARGS_ENV`
    (taken out of ``environ``, so the job's processes do not inherit it). The masked arguments
    come in the order they were masked; any that is missing means the command was edited."""
    from aitrain.errors import ConfigError

    environ = os.environ if environ is None else environ
    raw = environ.pop(SECRET_ARGS_ENV, None)
    if not raw:
        return list(argv)
    try:
        pairs = [(str(m), str(v)) for m, v in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{SECRET_ARGS_ENV} is not what aitrain puts there (a JSON list of pairs)",
                          f"unset {SECRET_ARGS_ENV}, or submit the job again with aitrain launch") from e
    out, i = [], 0
    for arg in argv:
        if i < len(pairs) and arg == pairs[i][0]:
            out.append(pairs[i][1])
            i += 1
        else:
            out.append(arg)
    if i != len(pairs):
        raise ConfigError(f"the command has {i} of the {len(pairs)} masked arguments {SECRET_ARGS_ENV} carries "
                          "values for (was the script edited?)",
                          "submit the job again with aitrain launch; it writes the script and passes the values")
    return out


def known_secrets(argv: Sequence[str] = (), env: Mapping[str, str] | None = None, doc: Any = None) -> set[str]:
    """The secret values in ``argv``, ``env`` and a JSON-like ``doc`` (what :func:`redact_argv`,
    :func:`redact_value` and :func:`redact_obj` mask), for :func:`scrub`: text built from them
    some other way still does not show them. Values under 6 characters are left out (they
    would mask innocent text); the rules by name and URI still mask those."""
    found: set[str] = set()
    for masked, arg in zip(redact_argv(list(argv)), argv, strict=True):
        found.update(_masked_parts(masked, arg))
    for k, v in (env or {}).items():
        found.update(_diff(v, redact_value(k, v)))
    if doc is not None:
        found.update(_diff(doc, redact_obj(doc)))
    return {s for s in found if len(s) >= 6}


def _diff(orig: Any, clean: Any) -> list[str]:
    """The strings of ``orig`` (or their parts) that are masked in ``clean``."""
    if isinstance(orig, str):
        if clean == orig or not isinstance(clean, str):
            return []
        return [orig] if clean == MASK else _masked_parts(clean, orig)
    if isinstance(orig, dict) and isinstance(clean, dict):
        return [s for k, v in orig.items() for s in _diff(v, clean.get(k))]
    if isinstance(orig, (list, tuple)) and isinstance(clean, list):
        return [s for o, c in zip(orig, clean, strict=False) for s in _diff(o, c)]
    return []


def _masked_parts(masked: str, original: str) -> list[str]:
    """The substrings of ``original`` that became ``***`` in ``masked``."""
    parts = masked.split(MASK)
    if len(parts) == 1:
        return []
    out, pos = [], 0
    for i, part in enumerate(parts):
        if i == 0:
            pos = len(part)
            continue
        end = original.find(part, pos) if part else len(original)
        if i == len(parts) - 1 and part:
            end = len(original) - len(part)
        if end < pos:
            return [original]
        out.append(original[pos:end])
        pos = end + len(part)
    return out


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with every known secret value replaced by ``***`` (longest first)."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


# -- files that hold a whole config (job.yaml, Hydra's .hydra/*.yaml) -------------------------------


def redact_yaml(text: str, keep: Sequence[str] = ()) -> str:
    """A YAML document with its secrets masked (:func:`redact_obj`); ``text`` itself when
    there was nothing to mask (the file keeps its exact form). ``keep``: dotted paths of
    prose left as it is (Hydra's help text says ``key=value``)."""
    import yaml

    doc = yaml.safe_load(text)
    clean = redact_obj(doc)
    for dotted in keep:
        src, dst = doc, clean
        *parents, last = dotted.split(".")
        for part in parents:
            src = src.get(part) if isinstance(src, dict) else None
            dst = dst.get(part) if isinstance(dst, dict) else None
        if isinstance(src, dict) and isinstance(dst, dict) and last in src:
            dst[last] = src[last]
    if clean == doc:
        return text

    class Dumper(yaml.SafeDumper):
        pass

    def string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, string)
    return str(yaml.dump(clean, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120))


def redact_yaml_file(path: Path, keep: Sequence[str] = ()) -> None:
    """Rewrite a YAML file aitrain did not write itself (Hydra's) without its secrets, 0600."""
    from aitrain.launcher.util import PRIVATE_FILE, write_atomic

    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    clean = redact_yaml(text, keep)
    if clean != text:
        write_atomic(path, clean)
    elif path.stat().st_mode & 0o777 != PRIVATE_FILE:
        os.chmod(path, PRIVATE_FILE)


def redact_hydra_output() -> None:
    """Hydra's own record of this job (``<output dir>/.hydra/{config,hydra,overrides}.yaml`` and a
    sweep's ``multirun.yaml``) rewritten without secrets. Hydra saves them before the task
    starts; the task calls this first. Nothing outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    files = []
    if hc.output_subdir is not None and hc.runtime.output_dir:
        subdir = Path(str(hc.runtime.output_dir)) / str(hc.output_subdir)
        files += [subdir / "config.yaml", subdir / "hydra.yaml", subdir / "overrides.yaml"]
    if hc.mode == RunMode.MULTIRUN and hc.sweep.dir:
        files.append(Path(str(hc.runtime.cwd or ".")) / str(hc.sweep.dir) / "multirun.yaml")
    for path in files:
        redact_yaml_file(path, keep=("hydra.help", "hydra.hydra_help") if path.name != "config.yaml" else ())
