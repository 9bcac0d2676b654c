"""The `mixq` command line: `mixq compose`, `mixq generate`, `mixq sweep`,
`mixq frontier`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx)
from mixq.config import load_params
from mixq.log import setup_logging

log = logging.getLogger("mixq")


def compose_params(
    overrides: list[str], conf_dir: Path = Path("conf"), output: Path = Path("params.yaml")
) -> None:
    """Compose ``conf_dir`` with Hydra ``overrides`` into ``output``, exactly as `dvc exp run -S`
    does (same DVC function, same plugin discovery, same YAML dump), then validate the result
    against the schema; ``output`` is replaced only when it is valid."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    staged = output.with_name(output.stem + ".staged" + output.suffix)
    try:
        compose_and_dump(
            staged, str(conf_dir.resolve()), None, "config", str(Path.cwd()), overrides
        )
        load_params(staged)
    except (HydraException, OmegaConfBaseException) as err:
        staged.unlink(missing_ok=True)
        raise SystemExit(f"mixq compose: invalid configuration: {describe_config_error(err)}")
    staged.replace(output)


def describe_config_error(err: Exception) -> str:
    """One line naming the offending key, from a Hydra/OmegaConf exception chain."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    key = getattr(cause, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mixq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compose", help="write params.yaml from conf/ (Hydra overrides allowed)")
    p.add_argument("overrides", nargs="*", help="e.g. quant.target_bpw=5.0 calibration=full")
    p.add_argument("--conf", type=Path, default=Path("conf"))
    p.add_argument("--output", type=Path, default=Path("params.yaml"))

    p = sub.add_parser("generate", help="generate with a mixq quant and its per-layer KV cache")
    p.add_argument("model", type=Path, help="model directory (e.g. outputs/quant)")
    p.add_argument("prompt", help="user message (the chat template is applied)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--kv-config", default=None,
                   help="kv_config.json (default: beside the model, else outputs/kv/ if it was "
                        "measured for this model); 'none' for an unquantized KV cache")

    p = sub.add_parser("frontier", help="quality/size Pareto frontier over the workspace and "
                                        "every DVC experiment (outputs/frontier/)")
    p.add_argument("--repo", type=Path, default=Path("."), help="DVC repository (default: .)")
    p.add_argument("--output", type=Path, default=None,
                   help="output folder (default: <repo>/outputs/frontier)")
    p.add_argument("--metrics", default=None,
                   help="eval metrics file of each run, relative to the repo "
                        "(default: outputs/eval/metrics.json)")
    p.add_argument("--all-commits", action="store_true",
                   help="also experiments based on earlier commits (default: HEAD's, as "
                        "`dvc exp show`)")

    sub.add_parser("sweep", add_help=False,
                   help="Hydra app: each job one `dvc exp run --temp` (e.g. mixq sweep -m "
                        "quant.target_bpw=4.25,4.5,5.0 [hydra/launcher=joblib]); --help: Hydra's")

    args, hydra_args = parser.parse_known_args(argv)
    if args.command == "sweep":
        from mixq.sweep import main as sweep_main

        setup_logging(args.verbose)
        return sweep_main(hydra_args)
    if hydra_args:
        parser.error(f"unrecognized arguments: {' '.join(hydra_args)}")
    setup_logging(args.verbose)
    if args.command == "compose":
        compose_params(args.overrides, args.conf, args.output)
        log.info("wrote %s", args.output)
    elif args.command == "generate":
        run_generate(args)
    elif args.command == "frontier":
        run_frontier(args)


def run_generate(args: argparse.Namespace) -> None:
    """`mixq generate`: load the model with its KV config, stream the completion to stdout.
    Bad arguments and unreadable files end it with one line naming them."""
    from mixq.runtime import generate, load

    if args.max_tokens < 1:
        raise SystemExit(f"mixq generate: --max-tokens must be at least 1, not {args.max_tokens}")
    if not (args.model / "config.json").is_file():
        what = "does not exist" if not args.model.exists() else "has no config.json"
        raise SystemExit(f"mixq generate: model directory {args.model} {what}")
    try:
        model, tokenizer, kv_config = load(args.model, args.kv_config)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise SystemExit(f"mixq generate: {err}")
    text = generate(model, tokenizer, args.prompt, kv_config, args.max_tokens, args.temp,
                    verbose=args.verbose)  # verbose: mlx-lm streams the text and its stats
    if not args.verbose:
        print(text)


def run_frontier(args: argparse.Namespace) -> None:
    """`mixq frontier`: write outputs/frontier/ and print the table as markdown."""
    from mixq.frontier import METRICS, frontier_markdown, write_frontier

    out_dir = args.output or args.repo / "outputs" / "frontier"
    rows = write_frontier(args.repo, out_dir, args.metrics or METRICS, args.all_commits)
    print(frontier_markdown(rows))
    log.info("wrote %s (%d points, %d Pareto-optimal)", out_dir, len(rows),
             sum(r["pareto"] for r in rows))


if __name__ == "__main__":
    main(sys.argv[1:])
