"""``python -m aitrain.fabric.probe``: this node's probe document as one line of JSON.

What launchers run on every node of a job (the user's command is ``aitrain fabric probe``)::

    python -m aitrain.fabric.probe [--host-check] [--cache] [--hostname NAME] [--rendezvous ADDR]

Exit 0 with the document on stdout; exit 2 with the reason on stderr when the probe cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys

from aitrain.errors import AitrainError
from aitrain.fabric.node import node_document


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aitrain.fabric.probe", description=__doc__.splitlines()[0])
    p.add_argument("--host-check", action="store_true", help="add this host's host-check findings")
    p.add_argument("--cache", action="store_true", help="reuse a cached probe while the host is unchanged")
    p.add_argument("--hostname", help="name the host this way (nodes may share one hostname)")
    p.add_argument("--rendezvous", help="the rendezvous address (routes to it are probed)")
    args = p.parse_args(argv)
    try:
        doc = node_document(hostname=args.hostname, rendezvous=args.rendezvous, host_check=args.host_check,
                            cache=args.cache)
    except AitrainError as e:
        print(f"aitrain: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
