"""The one CLI, ``clfpipe``: each subcommand parses its arguments and calls one library function.

Library code logs through module loggers and raises ``ClfpipeError``; here the log level is set
(``-v``/``-q``), results are printed, and errors become one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from clfpipe import __version__
from clfpipe.contract.errors import ClfpipeError, RecipeError


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from clfpipe.demo_data import LABELS_CSV, write_demo_dataset, write_demo_multilabel

    if args.multi_label:
        counts = write_demo_multilabel(args.out_dir, seed=args.seed)
        print(f"wrote {counts['train']} train and {counts['valid']} valid images to {args.out_dir}, tags in {LABELS_CSV}")
    else:
        counts = write_demo_dataset(args.out_dir, seed=args.seed)
        print(f"wrote {counts['train']} train and {counts['valid']} valid images to {args.out_dir}")


def _recipe(args: argparse.Namespace):
    from clfpipe.contract.recipe import load_recipe

    return load_recipe(args.recipe, args.set or [])


def _cmd_train(args: argparse.Namespace) -> None:
    from clfpipe.train.loop import train_run

    if args.resume:
        train_run(None, args.resume, resume=True)
    elif args.data is None or args.run is None:
        raise RecipeError("train: expected --data and --run, or --resume RUN_DIR")
    else:
        train_run(args.data, args.run, _recipe(args))


def _cmd_lr_find(args: argparse.Namespace) -> None:
    from clfpipe.train.loop import lr_find_for_run

    result = lr_find_for_run(args.run, args.stage)
    for name, lr in result.suggestions.items():
        print(f"{name}\t{lr:.3e}")


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from clfpipe.contract.engines import Variant
    from clfpipe.export.onnx_export import export_onnx

    variant = Variant(args.precision, args.fold_preprocess, args.fold_tta)
    export_onnx(args.run, args.data, variant=variant, calibration=args.calibration_images)


def _cmd_export_trt(args: argparse.Namespace) -> None:
    from clfpipe.export.tensorrt import build_engine

    build_engine(args.run, args.variant, min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)


def _cmd_verify(args: argparse.Namespace) -> int:
    from clfpipe.export.verify import format_table, verify_run

    rows, passed = verify_run(args.run, args.images)
    print(format_table(rows, rows[0].result.images))
    return 0 if passed else 1


def _cmd_repo(args: argparse.Namespace) -> None:
    from clfpipe.serve.repository import build_repository

    build_repository(args.run, args.out, args.target)


def _ports(args: argparse.Namespace):
    from clfpipe.serve.server import Ports

    return Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)


def _cmd_serve_up(args: argparse.Namespace) -> None:
    from clfpipe.serve.server import start_server

    info = start_server(args.repo, args.state_dir, host=args.host, ports=_ports(args), timeout=args.timeout,
                        model_control=args.model_control)
    print(f"tritonserver ready (pid {info.pid}): http {info.http_url}, grpc {info.grpc_url}, "
          f"metrics {info.host}:{info.ports.metrics}; log {info.log}")


def _cmd_serve_down(args: argparse.Namespace) -> None:
    from clfpipe.serve.server import stop_server

    info = stop_server(args.state_dir)
    print(f"stopped tritonserver (pid {info.pid})" if info else "no server running")


def _cmd_serve_status(args: argparse.Namespace) -> int:
    from clfpipe.serve.server import server_status

    info, state = server_status(args.state_dir)
    if info is None or state == "not running":
        print("not running")
        return 3  # like `systemctl status`: non-zero when nothing runs
    print(f"{state}: pid {info.pid}, http {info.http_url}, grpc {info.grpc_url}, repo {info.repo}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> None:
    from clfpipe.serve.client import Classifier

    client = Classifier(args.url, args.protocol, args.model)
    for p in client.predict(args.paths, top_k=args.top_k):
        if args.json:
            print(p.to_json())
        else:
            print(f"{p.file}\t" + "\t".join(f"{label} {prob:.4f}" for label, prob in p.top_k))


def _cmd_bench(args: argparse.Namespace) -> None:
    from clfpipe.serve.bench import sweep, write_results
    from clfpipe.serve.client import expand_inputs

    images = [f.read_bytes() for f in expand_inputs(args.images)]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    levels = sweep(args.url, args.model, images, protocol=args.protocol, concurrencies=concurrencies, batch=args.batch,
                   requests=args.requests, seconds=args.seconds)
    paths = write_results(levels, args.out, args.model)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _cmd_run(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import run_pipeline

    run_pipeline(args.data, args.run, _recipe(args))


def _cmd_demo(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import run_demo

    run_demo(args.workdir, _recipe(args), _ports(args), args.seed)


def _add_recipe_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recipe", type=Path, default=default, help="recipe TOML (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.0.epochs=2 or stages.*.size=96")


def _add_port_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clfpipe", description="Image classifier: train, export, serve on Triton, verify.")
    parser.add_argument("--version", action="version", version=f"clfpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("demo", help="write the deterministic demo dataset (fast.ai folder layout)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-label", action="store_true", help="Planet-style tags in labels.csv instead of class folders")
    p.set_defaults(func=_cmd_data_demo)

    p = sub.add_parser("train", help="train a recipe on DATA/train, validate on DATA/valid")
    p.add_argument("--data", type=Path)
    p.add_argument("--run", type=Path)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last epoch")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate sweep for a stage of a trained run (weights restored)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--stage", type=int, default=0)
    p.set_defaults(func=_cmd_lr_find)

    export = sub.add_parser("export", help="export a trained run").add_subparsers(dest="export_command", required=True)
    p = export.add_parser("onnx", help="ONNX with the PyTorch agreement gate")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, help="data folder for the gate (default: the one training used)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int8-trt"],
                   help="int8: uint8 activations for ONNX Runtime on x86; int8-trt: symmetric int8 for TensorRT")
    p.add_argument("--fold-preprocess", action="store_true", help="uint8 NHWC input, normalisation in the graph")
    p.add_argument("--fold-tta", action="store_true", help="the deterministic TTA views and averaging in the graph")
    p.add_argument("--calibration-images", type=int, help="int8 calibration set size (default: the recipe's)")
    p.set_defaults(func=_cmd_export_onnx)

    p = export.add_parser("trt", help="a TensorRT engine from an exported ONNX variant (needs TensorRT and a GPU)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--variant", default="onnx", help="artifact name, e.g. onnx, onnx-fp16, onnx-int8-trt")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.set_defaults(func=_cmd_export_trt)

    p = sub.add_parser("verify", help="every exported variant on every runtime here against PyTorch fp32")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--images", type=Path, help="a folder laid out like DATA/valid (default: the validation set)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("repo", help="generate the Triton model repository for a run")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--target", default="embedded", choices=["embedded", "container"],
                   help="embedded: the nvidia-pytriton binary; container: NVIDIA's Triton image (prints its docker run line)")
    p.add_argument("--out", type=Path, help="default: RUN/model_repository (container: RUN/model_repository_container)")
    p.set_defaults(func=_cmd_repo)

    serve = sub.add_parser("serve", help="the embedded Triton server").add_subparsers(dest="serve_command", required=True)
    for name, func, doc in (("up", _cmd_serve_up, "start and wait until ready"), ("down", _cmd_serve_down, "stop it and its stubs"),
                            ("status", _cmd_serve_status, "say what runs")):
        p = serve.add_parser(name, help=doc)
        p.add_argument("--state-dir", type=Path, help="pid file and log (default: $CLFPIPE_STATE_DIR or ~/.cache/clfpipe, /server)")
        p.set_defaults(func=func)
        if name == "up":
            p.add_argument("--repo", type=Path, required=True)
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
            p.add_argument("--model-control", default="none", choices=["none", "explicit", "poll"],
                           help="none (default): no remote load/unload; explicit: the repository API may load/unload")
            _add_port_args(p)

    p = sub.add_parser("predict", help="classify images with a running server")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT (8000 http, 8001 grpc by default)")
    p.add_argument("--protocol", default="http", choices=["http", "grpc"])
    p.add_argument("--model", default="classifier")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="latency/throughput sweep over concurrency against a running server")
    p.add_argument("--url", default="127.0.0.1:8000")
    p.add_argument("--protocol", default="http", choices=["http", "grpc"])
    p.add_argument("--model", default="classifier")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="requests per level")
    amount.add_argument("--seconds", type=float, help="seconds per level")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--images", nargs="+", required=True, metavar="IMAGE_OR_DIR")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json, bench.csv, bench.png")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("run", help="train, export and repo in one go")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the whole pipeline on the demo data, served by Triton")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    _add_recipe_args(p, default="recipes/demo.toml")
    _add_port_args(p)
    p.set_defaults(func=_cmd_demo)
    return parser


class _Format(logging.Formatter):
    """Progress and results as plain lines; warnings and debug lines say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"clfpipe: {record.levelname.lower()}: {message}"
        if record.levelno < logging.INFO:
            return f"[{record.name}] {message}"
        return message


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when a record arrives (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never take the command down
            self.handleError(record)


def configure_logging(verbose: int, quiet: int) -> None:
    """One handler on the 'clfpipe' logger; the level from -v/-q."""
    logger = logging.getLogger("clfpipe")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args) or 0
    except ClfpipeError as exc:
        print(f"clfpipe: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clfpipe predict ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("clfpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
