"""``python -m ldm_deploy.models save NAME DIR``: write a model (e.g. ``sd15-random``) as a diffusers
pipeline directory, so that other tools (Optimum, diffusers) can load exactly the same weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LdmDeployError, cli_entry
from . import known_names, load_model


@cli_entry("python -m ldm_deploy.models")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_deploy.models", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    save = sub.add_parser("save", help="save a model as a diffusers pipeline directory")
    save.add_argument("name", help=f"model name ({', '.join(known_names())}, a hub id or a directory)")
    save.add_argument("dir", type=Path, help="output directory (must not exist)")
    args = p.parse_args(argv)
    if args.dir.exists():
        raise LdmDeployError(f"{args.dir} already exists")
    load_model(args.name).save_pretrained(args.dir)
    print(f"saved {args.name} to {args.dir}")
    return 0


if __name__ == "__main__":
    main()
