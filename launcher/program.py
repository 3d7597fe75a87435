"""The rank program as the user typed it: torchrun's command shape, arguments byte for byte.

``aitrain launch [overrides...] -- train.py --lr 1e-3`` and ``aitrain launch [overrides...] --
-m pkg.module --x 1`` (as ``torchrun [options] train.py ...`` and ``torchrun -m pkg.module``)
become config keys (``script``/``module`` and ``script_args``), so the job's config, its
MLflow params, the dry run and every re-run of the job (an sbatch script, the Ray Jobs API,
a detached process) carry the program. Hydra's override grammar would re-type the values
(``1e-3`` -> ``0.001``, ``true`` -> ``True``, ``null`` -> a type error) and refuses some
(``--lr=0.1``), so each argument is passed as a quoted Hydra string, which Hydra and
OmegaConf keep exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aitrain.errors import ConfigError

_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\+)(?='|$)")


def hydra_quote(value: str, *, interpolate: bool = False) -> str:
    """``value`` as a single-quoted Hydra override string that composes back to ``value``.

    Hydra unescapes backslashes only before a quote or at the end of a quoted string, and
    OmegaConf resolves ``${...}`` inside strings: unless ``interpolate``, those are escaped
    too, so the rank sees the characters the user typed."""
    if not interpolate:
        # OmegaConf: `\${` is a literal `${`; a backslash before it must be escaped itself.
        value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    value = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def split_program(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(aitrain's own arguments, the rank program after the first ``--`` or None)."""
    args = list(argv)
    if "--" not in args:
        return args, None
    i = args.index("--")
    return args[:i], args[i + 1:]


def program_overrides(program: Sequence[str]) -> list[str]:
    """The config overrides for ``-- PROGRAM ARGS...`` (``script=``/``module=``, ``script_args=``)."""
    prog = list(program)
    if not prog:
        raise ConfigError("nothing follows `--`: it starts the rank program",
                          "aitrain launch [overrides] -- train.py [args]   or   -- -m pkg.module [args]")
    if prog[0] in ("-m", "--module"):
        if len(prog) < 2 or not prog[1] or prog[1].startswith("-"):
            raise ConfigError("`-- -m` needs a module name", "aitrain launch -- -m pkg.module [args]")
        head = [f"module={hydra_quote(prog[1])}"]
        args = prog[2:]
    elif prog[0].startswith("-m") and len(prog[0]) > 2:  # python's `-mpkg.mod`
        head = [f"module={hydra_quote(prog[0][2:])}"]
        args = prog[1:]
    elif prog[0].startswith("-"):
        raise ConfigError(f"`-- {prog[0]}`: after `--` comes the script (or -m module), then its arguments",
                          "put aitrain's overrides before `--`: aitrain launch nproc_per_node=2 -- train.py --lr 1e-3")
    else:
        head = [f"script={hydra_quote(prog[0])}"]
        args = prog[1:]
    return [*head, "script_args=[" + ",".join(hydra_quote(a) for a in args) + "]"]


def _split_list(text: str) -> list[str] | None:
    """The top-level elements of ``[a,b,...]`` as typed (quotes and nesting respected)."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    body = text[1:-1]
    items: list[str] = []
    cur: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(body):
        c = body[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(body):
                cur.append(body[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c in "[{(":
            depth += 1
            cur.append(c)
        elif c in "]})":
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if quote or depth:
        return None  # let Hydra report it
    items.append("".join(cur))
    if len(items) == 1 and not items[0].strip():
        return []
    return items


def quote_script_args(override: str) -> str:
    """``script_args=[--lr,1e-3,--flag,true]`` -> each unquoted element quoted, so Hydra keeps
    it as the string typed (``1e-3``, not 0.001). Quoted elements and ``${...}``
    interpolations are Hydra's and stay as they are."""
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+~") != "script_args":
        return override
    items = _split_list(value.strip())
    if items is None:
        return override
    out = []
    for item in items:
        s = item.strip()
        if s[:1] in ("'", '"') and s[-1:] == s[:1] and len(s) >= 2:
            out.append(s)
        else:
            out.append(hydra_quote(s, interpolate=True))
    return f"{key}=[{','.join(out)}]"
