"""The one CLI, ``clfpipe``: each subcommand parses its arguments and calls one library function.

Library code logs through module loggers and raises ``ClfpipeError``; here the log level is set
(``-v``/``-q``), results are printed, and errors become one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clfpipe import __version__
from clfpipe.contract.errors import ClfpipeError, DataError, RecipeError, first_line

if TYPE_CHECKING:
    from clfpipe.contract.cleaning import Plan

log = logging.getLogger(__name__)


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from clfpipe.demo_data import LABELS_CSV, write_demo_dataset, write_demo_multilabel

    if args.multi_label:
        counts = write_demo_multilabel(args.out_dir, seed=args.seed)
        print(f"wrote {counts['train']} train and {counts['valid']} valid images to {args.out_dir}, tags in {LABELS_CSV}")
    else:
        counts = write_demo_dataset(args.out_dir, seed=args.seed)
        print(f"wrote {counts['train']} train and {counts['valid']} valid images to {args.out_dir}")


def _cmd_data_check(args: argparse.Namespace) -> int:
    from clfpipe.contract.dataset import check_data, move_aside
    from clfpipe.contract.similar import HASH_BITS

    found = check_data(args.data, args.labels_csv, args.workers, args.near_copies)
    for path, why in found.unusable:
        print(f"{path}\t{why}")
    for copy in found.duplicates:
        print(f"{copy.path}\tsame bytes as {copy.first}: {copy.why}")
    for near in found.near or ():
        print(f"{near.path}\tlooks like {near.first} ({near.bits} of {HASH_BITS} hash bits differ): {near.why}")
    skipped = ", ".join(f"{n} {suffix}" for suffix, n in found.skipped.items())
    looking = "" if found.near is None else f", {len(found.near)} looking like another"
    log.info("data check: %d images, %d unusable, %d repeating another's bytes%s%s", found.images, len(found.unusable),
             len(found.duplicates), looking, f"; not read as images: {skipped}" if skipped else "")
    copies = bool(found.duplicates or found.near)
    if found.unusable and args.move_to is not None:
        moved = move_aside([path for path, _ in found.unusable], args.data, args.move_to)
        log.info("data check: moved %d unusable files to %s", len(moved), args.move_to)
        return 2 if copies else 0
    return 2 if found.unusable or copies else 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from clfpipe.contract.holdout import split_dataset

    done = split_dataset(args.src, args.out, args.valid_pct, args.seed, args.labels_csv, args.classes_csv, args.near_copies)
    classes = f" of {done.classes} classes" if done.classes else ""
    how = f"{done.copied} copied, the rest hard links" if done.copied else "hard links"
    print(f"wrote {done.train} train and {done.valid} valid images{classes} to {args.out} ({how})")
    if done.outside:
        log.warning("data split: %d images directly in %s, in no class folder, were left out", done.outside, args.src)
    return 0


def _cmd_data_clean(args: argparse.Namespace) -> int:
    from clfpipe.contract.cleaning import ASIDE, NO_TAGS, apply_plan, run_plan

    if args.apply is None:
        if args.move_to is not None or args.dry_run:
            raise DataError("data clean: --move-to and --dry-run go with --apply CSV")
        from clfpipe.train.clean import clean_run

        table, ranking = clean_run(args.run, args.show, args.out, args.data, args.tta)
        rows = len(ranking.rows)
        print(f"wrote {table} ({rows} images, highest loss first) and {table.parent / 'index.html'} "
              f"(the top {min(args.show, rows)})")
        print(f"next: set the action of the images to clean to {ranking.edits()}; then "
              f"'clfpipe data clean --run {args.run} --apply {table}'")
        return 0
    if args.out is not None or args.show != SHOWN or args.tta:
        raise DataError("data clean: --out, --show and --tta make the table: expected none of them with --apply")
    data, plan = run_plan(args.run, args.apply, args.data)
    move_to = args.move_to or data / ASIDE
    moves = apply_plan(plan, data, move_to, dry_run=args.dry_run)
    for source, target in moves:
        print(f"{source}\t{target}")
    for file, tags in plan.retag:
        print(f"{file}\ttags: {' '.join(tags) or NO_TAGS}")
    log.info("data clean: %s%s", "; ".join(_cleaned(plan, move_to, args.dry_run)), "" if args.dry_run else ": train again to use them")
    return 0


def _cleaned(plan: Plan, move_to: Path, dry_run: bool) -> list[str]:
    """What --apply did, or would do, in words: a multi-label run's images are retagged, not relabelled."""
    def images(n: int) -> str:
        return f"{n} image{'' if n == 1 else 's'}"

    said = [f"{'would move' if dry_run else 'moved'} {images(len(plan.delete))} to {move_to}"]
    if plan.tags_table is None:
        said[0] += f" and {images(len(plan.relabel))} into another class's folder"
    else:
        said.append(f"{'would retag' if dry_run else 'retagged'} {images(len(plan.retag))} in {plan.tags_table}")
    return said


def _recipe(args: argparse.Namespace):
    from clfpipe.contract.recipe import load_recipe

    return load_recipe(args.recipe, args.set or [])


def _cmd_train(args: argparse.Namespace) -> int | None:
    from clfpipe.train.distributed import check_nproc, launch_local, without_option
    from clfpipe.train.loop import RECIPE_FILE, train_run

    check_nproc(args.nproc)
    if args.nproc > 1:  # this command again, under torchrun
        return launch_local(args.nproc, without_option(args.argv, "--nproc"))
    if args.resume:
        given = [name for name, value in (("--data", args.data), ("--run", args.run), ("--recipe", args.recipe),
                                          ("--set", args.set)) if value]
        if given:  # its schedule and batches are the recipe's it started with: a changed one would not resume it
            raise RecipeError(f"train --resume continues a run with its own recipe and data ({RECIPE_FILE}): expected "
                              f"no --data, --run, --recipe or --set with it, got {', '.join(given)}")
        train_run(None, args.resume, resume=True)
    elif args.data is None or args.run is None:
        raise RecipeError("train: expected --data and --run, or --resume RUN_DIR")
    else:
        train_run(args.data, args.run, _recipe(args))


def _cmd_lr_find(args: argparse.Namespace) -> None:
    from clfpipe.train.loop import lr_find_for_run

    result = lr_find_for_run(args.run, args.stage, args.data)
    for name, lr in result.suggestions.items():
        print(f"{name}\t{lr:.3e}")


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from clfpipe.contract.engines import Variant
    from clfpipe.export.onnx_export import export_onnx
    from clfpipe.pipeline import export_served

    if args.precision is None and not args.fold_preprocess and not args.fold_tta:
        made = export_served(args.run, args.data)  # what the repository serves
        print(f"exported {', '.join(v.name for v in made)}" if made else "the served variants are exported already")
        return
    variant = Variant(args.precision or "fp32", args.fold_preprocess, args.fold_tta)
    export_onnx(args.run, args.data, variant=variant, calibration=args.calibration_images)


def _cmd_export_pt2(args: argparse.Namespace) -> None:
    from clfpipe.export.pt2_export import export_pt2

    export_pt2(args.run, precision=args.precision, fold_tta=args.fold_tta, data_dir=args.data, aoti=not args.no_aoti)


def _cmd_export_trt(args: argparse.Namespace) -> None:
    from clfpipe.export.tensorrt import build_engine

    build_engine(args.run, args.variant, min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)


def _cmd_verify(args: argparse.Namespace) -> int:
    from clfpipe.export.verify import format_table, verify_run

    if not args.served and (args.url or args.protocol or args.state_dir):
        raise ClfpipeError("--url, --protocol and --state-dir name the server that --served checks: expected --served with them")
    if args.served:
        from clfpipe.pipeline import verify_with_server

        verification = verify_with_server(args.run, args.images, args.url, args.protocol, args.state_dir)
    else:
        verification = verify_run(args.run, args.images)
    print(format_table(verification))
    return 0 if verification.passed else 1


def _cmd_repo(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import repository_for_run

    repo = repository_for_run(args.run, args.out, args.target)
    print(repo)
    if args.archive:
        from clfpipe.serve.repository import archive_repository

        print(archive_repository(repo))


def _cmd_deploy(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import deploy_run
    from clfpipe.serve.deploy import Deployment

    deployment = Deployment(name=args.name, namespace=args.namespace, replicas=args.replicas, max_replicas=args.max_replicas,
                            gpus=args.gpu, repository_uri=args.repository_uri, pvc=getattr(args, "pvc", None),
                            image=args.image, queue_target_us=args.queue_target_us)
    for path in deploy_run(args.run, args.deploy_command, deployment, args.out):
        print(path)


def _ports(args: argparse.Namespace):
    from clfpipe.serve.server import Ports

    return Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)


def _cmd_serve_up(args: argparse.Namespace) -> None:
    from clfpipe.serve.server import check_start, start_server

    ports, repo = _ports(args), args.repo
    # everything it is told checked before a repository is made for --run
    check_start(args.host, args.timeout, args.model_control, args.allow_remote_model_control)
    if args.run is not None:
        from clfpipe.pipeline import repository_for_run

        repo = repository_for_run(args.run)
    info = start_server(repo, args.state_dir, host=args.host, ports=ports, timeout=args.timeout,
                        model_control=args.model_control, allow_remote_model_control=args.allow_remote_model_control,
                        supervise=not args.no_supervisor)
    watched = f", supervisor pid {info.supervisor['pid']}" if info.supervisor else ", no supervisor"
    print(f"tritonserver serving (pid {info.pid}{watched}): http {info.http_url}, grpc {info.grpc_url}, "
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
    from clfpipe.serve.server import served_engines

    word, _, detail = state.partition(": ")
    restarts = f"; {len(info.restarts)} restart(s), the last at {info.restarts[-1]['time']}" if info.restarts else ""
    engines = ", ".join(f"{m} on {e}" for m, e in served_engines(Path(info.repo)).items())
    print(f"{word}: pid {info.pid}, http {info.http_url}, grpc {info.grpc_url}, repo {info.repo} ({engines}){restarts}"
          + (f"; {detail}" if detail else ""))
    return 0 if state == "ready" else 1


def _cmd_predict(args: argparse.Namespace) -> int:
    from clfpipe.contract.manifest import atomic_write_bytes, check_out_file
    from clfpipe.serve.client import Classifier, Failure, predictions_csv

    if args.csv is not None:
        check_out_file(args.csv, "predict", "--csv")  # before the requests, not after
    client = Classifier(args.url, args.protocol, args.model, state_dir=args.state_dir)
    failed, answered = 0, []
    for p in client.predict_each(args.paths, top_k=args.top_k):
        if isinstance(p, Failure):  # one line per bad image; the others still get their answers
            print(f"clfpipe: error: {p.file}: {p.error}", file=sys.stderr)
            failed += 1
        elif args.csv is not None:
            answered.append(p)
        elif args.json:
            print(p.to_json())
        else:  # multi-label: the tags claimed (none: "-"); else the top-k classes
            shown = p.top_k if p.tags is None else p.tags
            print(f"{p.file}\t" + ("\t".join(f"{label} {prob:.4f}" for label, prob in shown) or "-"), flush=True)
    if args.csv is not None:  # whole or not at all: an interrupted run leaves no table that looks complete
        atomic_write_bytes(args.csv, predictions_csv(answered, client.classes, client.threshold is not None))
        print(f"wrote {args.csv}: {len(answered)} images, {len(client.classes)} classes")
    return 2 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> None:
    from clfpipe.contract.manifest import check_out_folder
    from clfpipe.serve.bench import check_amounts, check_sweep, load_images, sample_evenly, sweep, write_results
    from clfpipe.serve.client import expand_inputs, resolve_endpoint

    url, protocol = resolve_endpoint(args.url, args.protocol, args.state_dir)
    amounts = {"concurrencies": _levels(args.concurrency), "batch": args.batch, "requests": args.requests,
               "seconds": args.seconds, "window_s": args.window, "max_windows": args.max_windows}
    check_sweep(protocol, **amounts)
    check_amounts({"--max-images": args.max_images})
    check_out_folder(args.out, "bench")  # before minutes of measuring, not after
    files = expand_inputs(args.images)
    chosen = sample_evenly(files, args.max_images)  # each is checked, then held in memory, before the first request
    if len(chosen) < len(files):
        log.info("bench: sending %d of the %d images, spread evenly over them (--max-images)", len(chosen), len(files))
    images = load_images(chosen)
    levels = sweep(url, args.model, images, protocol=protocol, **amounts)
    paths = write_results(levels, args.out, args.model)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ClfpipeError(f"--concurrency: expected comma-separated positive integers like 1,4,16, got {text!r}")
    return levels


def _cmd_run(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import run_pipeline

    run_pipeline(args.data, args.run, _recipe(args))


def _cmd_demo(args: argparse.Namespace) -> None:
    from clfpipe.pipeline import run_demo

    run_demo(args.workdir, _recipe(args), _ports(args), args.seed)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help with '(default: X)' where a default says something (not for None or off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


SHOWN = 50  # images the data-cleaning page draws unless --show says
STATE_HELP = "folder of the server's pid file and log (default: $CLFPIPE_STATE_DIR/server, else ~/.cache/clfpipe/server)"


def _add_recipe_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recipe", default=default,
                   help="recipe TOML, or the name of one that ships with clfpipe (demo, resnet34, resnext50)"
                        + ("" if default else " (default: the built-in defaults)"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key (repeatable), e.g. stages.0.epochs=2 or stages.*.size=96; stages count from 0")


def _add_port_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP/REST port")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port")


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="HOST:PORT of a Triton server (default: the one 'clfpipe serve up' recorded)")
    p.add_argument("--protocol", choices=["http", "grpc"],
                   help="http or grpc (default: http, or grpc when --url is the recorded gRPC port)")
    p.add_argument("--state-dir", type=Path, help=STATE_HELP)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    _add_endpoint_args(p)
    p.add_argument("--model", default="classifier", help="served model: classifier or classifier_tta")


def _sub(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_Help)


def _near_copies_arg(p: argparse.ArgumentParser, what: str) -> None:
    from clfpipe.contract.similar import HASH_BITS, NEAR_BITS

    p.add_argument("--near-copies", type=int, nargs="?", const=NEAR_BITS, metavar="BITS",
                   help=f"{what}: perceptual hashes at most BITS of {HASH_BITS} apart (default {NEAR_BITS})")


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = _sub(sub, "data", "datasets").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = _sub(data, "demo", "write the deterministic demo dataset (fast.ai folder layout)")
    p.add_argument("out_dir", type=Path, help="folder to write train/ and valid/ into")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated images")
    p.add_argument("--multi-label", action="store_true", help="Planet-style tags in labels.csv instead of class folders")
    p.set_defaults(func=_cmd_data_demo)
    p = _sub(data, "check", "decode every image of a data folder as training does: list the unusable ones, and the "
                            "files that repeat another's bytes (exit status 2 if any); or move the unusable ones aside")
    p.add_argument("data", type=Path, help="image folder with train/<class>/ and valid/<class>/")
    p.add_argument("--labels-csv", default="", help="multi-label tags CSV in DATA, as the recipe's data.labels_csv")
    p.add_argument("--move-to", type=Path, help="move the unusable files here, each at its path under DATA (repeated "
                                                "ones stay: which copy goes is the user's choice)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    _near_copies_arg(p, "also list the images that look like an earlier one (resized, saved again)")
    p.set_defaults(func=_cmd_data_check)
    p = _sub(data, "split", "hold out part of each class for validation: SRC/<class>/ into OUT/train/<class>/ and "
                            "OUT/valid/<class>/ (hard links: SRC is not changed)")
    p.add_argument("src", type=Path, help="image folder with <class>/ folders (or images named in --classes-csv or "
                                          "--labels-csv)")
    p.add_argument("out", type=Path, help="new folder to write train/ and valid/ into")
    p.add_argument("--valid-pct", type=float, default=0.2, help="fraction of each class held out for validation")
    p.add_argument("--seed", type=int, default=0, help="which images are held out")
    p.add_argument("--labels-csv", type=Path, help="tags CSV of multi-label images in SRC: copied into OUT, to be "
                                                     "the recipe's data.labels_csv")
    p.add_argument("--classes-csv", type=Path, help="CSV of single-label images in SRC, as fastai's from_csv reads it (a "
                                                      "header, then image,class rows): each lands in OUT/<split>/<class>/")
    _near_copies_arg(p, "hold out the images of a class that look alike (resized, saved again) together too")
    p.set_defaults(func=_cmd_data_split)
    p = _sub(data, "clean", "rank every image of a run's data by its loss (fastai's top losses) into a table to edit, "
                            "and a page of the highest; --apply carries out the edited table")
    p.add_argument("--run", type=Path, required=True, help="a trained run directory")
    p.add_argument("--data", type=Path, help="the run's image folder (default: the one training read)")
    p.add_argument("--out", type=Path, help="folder for cleaning.csv and index.html (default: RUN/clean)")
    p.add_argument("--show", type=int, default=SHOWN, help="images index.html draws, highest loss first")
    p.add_argument("--tta", action="store_true", help="rank by the deterministic TTA views' mean probabilities (as the "
                                                      "served TTA ensemble answers), not the plain predictions")
    p.add_argument("--apply", type=Path, metavar="CSV", help="carry out an edited table: each image whose action is "
                   "delete is moved aside, each set to a class moved into that class's folder of its split (multi-label: "
                   "each set to tags retagged in the tags table)")
    p.add_argument("--move-to", type=Path, help="with --apply: where deleted images go, each at its path under DATA "
                                                "(default: DATA/removed)")
    p.add_argument("--dry-run", action="store_true", help="with --apply: print the moves, make none")
    p.set_defaults(func=_cmd_data_clean)


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    p = _sub(sub, "train", "train a recipe on DATA/train, validate on DATA/valid (or DATA/val)")
    p.add_argument("--data", type=Path, help="image folder with train/<class>/ and valid/<class>/ (required unless --resume)")
    p.add_argument("--run", type=Path, help="new run directory to write (required unless --resume)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last epoch")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine, under torchrun (one per GPU; gloo on the CPU); data.batch_size "
                        "stays the global batch")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train)

    p = _sub(sub, "lr-find", "learning-rate sweep for a stage of a trained run, from the weights that stage started from")
    p.add_argument("--run", type=Path, required=True, help="a trained run directory")
    p.add_argument("--stage", type=int, default=0, help="stage index, counted from 0 as in --set stages.N")
    p.add_argument("--data", type=Path, help="image folder with the run's classes (default: the one training used)")
    p.set_defaults(func=_cmd_lr_find)


def _add_export_commands(sub: argparse._SubParsersAction) -> None:
    export = _sub(sub, "export", "export a trained run").add_subparsers(dest="export_command", required=True, metavar="COMMAND")
    p = _sub(export, "onnx", "ONNX behind the PyTorch agreement gate; with no variant flags, every variant the server needs")
    p.add_argument("--run", type=Path, required=True, help="a trained run directory")
    p.add_argument("--data", type=Path, help="data folder for the gate (default: the one training used)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int8-trt"],
                   help="one variant at this precision (fp32 when only --fold-* is given); int8: uint8 activations for "
                        "ONNX Runtime on x86; int8-trt: symmetric int8 for TensorRT")
    p.add_argument("--fold-preprocess", action="store_true", help="uint8 NHWC input, normalisation in the graph")
    p.add_argument("--fold-tta", action="store_true", help="the deterministic TTA views and averaging in the graph")
    p.add_argument("--calibration-images", type=int, help="int8 calibration set size (default: the recipe's export.calibration_images)")
    p.set_defaults(func=_cmd_export_onnx)

    p = _sub(export, "pt2", "torch.export + AOTInductor package of the folded graph (uint8 pixels in), load-checked "
                           "in a child process and gated against PyTorch")
    p.add_argument("--run", type=Path, required=True, help="a trained run directory")
    p.add_argument("--data", type=Path, help="data folder for the gate (default: the one training used)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="fp16 and bf16 need CUDA")
    p.add_argument("--fold-tta", action="store_true", help="the deterministic TTA views and averaging in the graph")
    p.add_argument("--no-aoti", action="store_true", help="keep the exported program (engine torch) without compiling "
                                                          "an AOTInductor package: seconds instead of minutes")
    p.set_defaults(func=_cmd_export_pt2)

    p = _sub(export, "trt", "a TensorRT engine from an exported ONNX variant (needs TensorRT and a GPU)")
    p.add_argument("--run", type=Path, required=True, help="a run directory with exported variants")
    p.add_argument("--variant", default="onnx", help="artifact name, e.g. onnx, onnx-fp16, onnx-int8-trt-pre")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the optimization profile")
    p.add_argument("--opt-batch", type=int, default=8, help="batch TensorRT tunes for")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the optimization profile")
    p.set_defaults(func=_cmd_export_trt)

    p = _sub(sub, "verify", "every exported variant on every runtime here (and with --served the running server) against PyTorch fp32")
    p.add_argument("--run", type=Path, required=True, help="a run directory with exported variants")
    p.add_argument("--images", type=Path, help="a folder laid out like DATA/valid, with some or all of the run's classes (default: the validation set)")
    p.add_argument("--served", action="store_true",
                   help="also the running server: its classifier and classifier_tta against PyTorch fp32 on the same images")
    _add_endpoint_args(p)
    p.set_defaults(func=_cmd_verify)


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    p = _sub(sub, "repo", "the Triton model repository for a run (exporting what it serves first, if missing)")
    p.add_argument("--run", type=Path, required=True, help="a trained run directory")
    p.add_argument("--target", default="embedded", choices=["embedded", "container"],
                   help="embedded: the nvidia-pytriton binary; container: NVIDIA's Triton image (prints its docker run line)")
    p.add_argument("--out", type=Path, help="folder to write (default: RUN/model_repository, container: RUN/model_repository_container)")
    p.add_argument("--archive", action="store_true", help="also write FOLDER.tar.gz beside it, to upload (KServe unpacks it)")
    p.set_defaults(func=_cmd_repo)

    deploy = _sub(sub, "deploy", "manifests that serve a run's container repository on a cluster")
    targets = deploy.add_subparsers(dest="deploy_command", required=True, metavar="TARGET")
    for target, doc in (("k8s", "Deployment, Services, HorizontalPodAutoscaler on queue time, PodDisruptionBudget, probes"),
                        ("kserve", "KServe's InferenceService (v1beta1, Triton runtime)")):
        p = _sub(targets, target, doc)
        p.add_argument("--run", type=Path, required=True, help="a trained run directory")
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--repository-uri", help="s3://, gs:// or as:// holding 'clfpipe repo --target container'")
        if target == "k8s":
            source.add_argument("--pvc", help="a PersistentVolumeClaim holding the container repository (mounted at /models)")
        p.add_argument("--name", default="clfpipe", help="name of every resource")
        p.add_argument("--namespace", help="namespace of every resource (default: kubectl's current one)")
        p.add_argument("--replicas", type=int, default=2, help="replicas to start with, and the autoscaler's minimum")
        p.add_argument("--max-replicas", type=int, default=8, help="the autoscaler's maximum")
        p.add_argument("--gpu", type=int, default=1, help="GPUs per replica (0: CPU only)")
        p.add_argument("--image", help="a Triton image that has Pillow and numpy<2 " + (
            "(default: the recipe's serve.container_image, installing both at start)" if target == "k8s" else
            "(needed: KServe runs its image as it is, and NVIDIA's lacks Pillow)"))
        p.add_argument("--queue-target-us", type=int, default=20_000,
                       help="scale out when requests wait longer than this at the backbone (microseconds)")
        p.add_argument("--out", type=Path, help="folder for the YAML files (default: RUN/deploy/<target>)")
        p.set_defaults(func=_cmd_deploy)

    serve = _sub(sub, "serve", "the embedded Triton server").add_subparsers(dest="serve_command", required=True, metavar="COMMAND")
    for name, func, doc in (("up", _cmd_serve_up, "start the server and wait until it is ready"),
                            ("down", _cmd_serve_down, "stop the server and its python stubs"),
                            ("status", _cmd_serve_status, "send a real request through every ensemble: ready (exit 0), "
                                                          "unhealthy or starting (1), not running (3)")):
        p = _sub(serve, name, doc)
        p.add_argument("--state-dir", type=Path, help=STATE_HELP)
        p.set_defaults(func=func)
        if name == "up":
            source = p.add_mutually_exclusive_group(required=True)
            source.add_argument("--repo", type=Path, help="a model repository made by 'clfpipe repo'")
            source.add_argument("--run", type=Path, help="a trained run: its repository is made (exports first) and served")
            p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
            p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
            p.add_argument("--model-control", default="none", choices=["none", "explicit", "poll"],
                           help="none: what the repository holds is what runs; explicit/poll: the repository API may "
                                "load and unload models, whose model.py then runs as this user (loopback only)")
            p.add_argument("--allow-remote-model-control", action="store_true",
                           help="allow explicit/poll on a non-loopback --host (any client reaching it may run code)")
            p.add_argument("--no-supervisor", action="store_true",
                           help="no supervisor process that probes every ensemble and restarts a broken server")
            _add_port_args(p)

    p = _sub(sub, "predict", "classify images with a running server")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    _add_client_args(p)
    p.add_argument("--top-k", type=int, default=1, help="labels shown per image, most probable first (multi-label: the tags above the model's "
                        "threshold are shown instead; --json holds both)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per image and line: file, label, prob, probs, top_k")
    out.add_argument("--csv", type=Path, metavar="FILE",
                     help="write one row per image instead (a submission): file, label (multi-label: tags, space-separated), "
                          "then each class's probability")
    p.set_defaults(func=_cmd_predict)

    p = _sub(sub, "bench", "latency/throughput sweep over concurrency against a running server")
    _add_client_args(p)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of concurrent clients")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="a fixed number of requests per level (default: measure until stable)")
    amount.add_argument("--seconds", type=float, help="a fixed duration per level (default: measure until stable)")
    p.add_argument("--window", type=float, default=2.0,
                   help="seconds per measurement window; a level is stable when 3 windows in a row agree within 10%%")
    p.add_argument("--max-windows", type=int, default=10, help="windows per level before giving up on stability")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--images", nargs="+", required=True, metavar="IMAGE_OR_DIR", help="image files or folders to send")
    p.add_argument("--max-images", type=int, default=512,
                   help="send at most this many of them, spread evenly over the list: each is decoded to check it and "
                        "held in memory first")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json, bench.csv, bench.png")
    p.set_defaults(func=_cmd_bench)


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    p = _sub(sub, "run", "train, export and make the repository in one go")
    p.add_argument("--data", type=Path, required=True, help="image folder with train/<class>/ and valid/<class>/")
    p.add_argument("--run", type=Path, required=True, help="new run directory to write")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_run)

    p = _sub(sub, "demo", "the whole pipeline on the demo data, served by Triton and checked against PyTorch")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="folder for the data, the run and the server state")
    p.add_argument("--seed", type=int, default=0, help="random seed of the demo images")
    _add_recipe_args(p, default="demo")
    _add_port_args(p)
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clfpipe", description="Image classifier: train, export, serve on Triton, verify.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"clfpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_data_commands, _add_train_commands, _add_export_commands, _add_serve_commands, _add_pipeline_commands):
        add(sub)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args) or 0
    except ClfpipeError as exc:  # one line, whatever a library's message it quotes ran on to
        log.debug("%s", exc, exc_info=True)
        print(f"clfpipe: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clfpipe predict ... | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # the machine, not the input: a folder that cannot be written, a full disk
        log.debug("%s", exc, exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"clfpipe: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clfpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
