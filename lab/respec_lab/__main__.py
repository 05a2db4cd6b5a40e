"""CLI: ``python -m respec_lab build --preset demo`` builds (or finds in the cache) the lab and prints its
LabPaths as JSON on the last stdout line, for scripts to read."""

import argparse
import dataclasses
import json
import logging

from respec_lab.build import PRESETS, build_lab


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m respec_lab")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the lab into $RESPEC_CACHE (default ~/.cache/respec)")
    build.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    build.add_argument("--cache-dir", default=None, help="cache root instead of $RESPEC_CACHE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(dataclasses.asdict(build_lab(args.preset, args.cache_dir))))


if __name__ == "__main__":
    main()
