"""The `imgcls` command line. Each subcommand has a few flags; everything else is config (`key=value`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from imgcls.errors import ImgclsError

log = logging.getLogger("imgcls")


def _train(args: argparse.Namespace) -> int:
    from imgcls.config import load_config
    from imgcls.train import train

    overrides, data = list(args.overrides), args.data
    if data and "=" in data:  # `imgcls train -c x.yaml key=value`: the first override landed in DATA
        overrides.insert(0, data)
        data = None
    if args.resume:
        if data:
            raise ImgclsError("give either DATA or --resume RUN, not both")
        train(resume=args.resume, overrides=overrides)
        return 0
    if data:
        overrides.insert(0, f"data.path={data}")
    config = load_config(args.config, overrides)
    if not config.data.path:
        raise ImgclsError("no data: give DATA (a folder, a CSV, or fashion-mnist/digits) or data.path in the config")
    train(config, force=args.force)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from imgcls.config import load_config
    from imgcls.data import cache_dir
    from imgcls.train import cache_dataset

    config, count = cache_dataset(load_config(args.config, [f"data.path={args.data}", *args.overrides]))
    log.info(f"{count} images decoded at {config.data.image_size} px ({config.data.resize}) for "
             f"model.name={config.model.name}, in {cache_dir() / 'decoded'}; `imgcls train` with the same "
             "settings starts from it")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    from imgcls.config import load_config
    from imgcls.lr_finder import find_learning_rate

    config = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    result = find_learning_rate(config, start_lr=args.start, end_lr=args.end, steps=args.steps)
    log.info(f"suggested learning rate {result['suggested_lr']:.2e} (valley; steepest descent at "
             f"{result['steepest_lr']:.2e}, lowest loss at {result['minimum_lr']:.2e}); plot: {result['plot']}")
    print(f"optim.lr={result['suggested_lr']:.2e}")  # stdout: ready to paste after `imgcls train DATA`
    return 0


def _eval(args: argparse.Namespace) -> int:
    from imgcls.evaluate import evaluate

    metrics = evaluate(args.run, split=args.split, data=args.data, device=args.device, quiet=args.json,
                       explain=not args.no_explain, layer=args.layer)
    if args.json:
        print(json.dumps(metrics))
    return 0


def _report(args: argparse.Namespace) -> int:
    import csv

    from imgcls.evaluate import evaluate
    from imgcls.report import write_report

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ImgclsError(f"{run} is not a run folder (no config.yaml); give runs/NAME")
    split = args.split
    if split is None:  # train.py's choice: test, or val for data without a test split
        with open(run / "splits.csv", newline="") if (run / "splits.csv").is_file() else open(os.devnull) as handle:
            splits = {row["split"] for row in csv.DictReader(handle)}
        split = "test" if "test" in splits or not splits else "val"
    own_split = "_" not in split  # "<folder>_<split>" tags come from `imgcls eval --data`, which must be re-run
    if own_split and (args.refresh or not (run / f"gradcam_{split}.png").is_file()):
        log.info(f"evaluating {split} with explanations (Grad-CAM, activation maps, t-SNE) for the report")
        evaluate(run, split=split, device=args.device, quiet=True, layer=args.layer)
    path = write_report(run, split, args.out)
    log.info(f"report: {path}  (self-contained: open it in any browser, share the one file)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from imgcls.predict import expand_paths, load, write_predictions_csv

    classifier = load(args.run, args.device)
    paths = expand_paths(args.paths)
    rows = classifier.predict(paths, topk=args.topk, reject=args.reject)
    topk = max(1, min(args.topk, len(classifier.class_names)))
    failed = sum(1 for row in rows if row["error"])
    if args.out:
        write_predictions_csv(args.out, rows, topk)
        log.info(f"wrote {len(rows)} predictions to {args.out}" + (f" ({failed} unreadable)" if failed else ""))
    elif sys.stdout.isatty():
        _print_predictions(rows)
    else:  # piped: CSV on stdout
        write_predictions_csv(sys.stdout, rows, topk)
    if failed:
        log.warning(f"{failed} of {len(rows)} files could not be read; see the error column")
    if args.reject:
        from imgcls.predict import UNKNOWN

        rejected = sum(1 for row in rows if row["label"] == UNKNOWN)
        log.info(f"{rejected} of {len(rows)} answered '{UNKNOWN}' (confidence below "
                 f"{classifier.reject_threshold(args.reject):.3f})")
    return 0


def _print_predictions(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("path", "label", "confidence", "top-k", "error")
    for row in rows:
        tops = ", ".join(f"{row[f'label_{k}']} {row[f'prob_{k}']:.2f}" for k in range(2, 6) if f"label_{k}" in row)
        confidence = f"{row['confidence']:.3f}" if row["confidence"] is not None else ""
        table.add_row(row["path"], row["label"], confidence, tops, row["error"])
    Console().print(table)


def _models(args: argparse.Namespace) -> int:
    from imgcls.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise ImgclsError(f"no model matches '{args.pattern}'; try a wider pattern such as '*{args.pattern}*'")
    print("\n".join(names))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from imgcls.data import PACKAGED, cache_dir, materialise

    if args.name is None:
        for name, description in PACKAGED.items():
            print(f"{name:15s} {description}")
        print(f"(cache folder: {cache_dir()}; set IMGCLS_CACHE_DIR to move it)")
        return 0
    print(materialise(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description="Train, evaluate and use image classifiers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model; creates runs/<name>/",
                                description="Train a model. Config keys are set with key=value (e.g. train.epochs=5).")
    train.add_argument("data", nargs="?", help="folder, CSV manifest or packaged dataset (fashion-mnist, digits)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("-c", "--config", help="YAML config file (e.g. runs/NAME/config.yaml)")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--force", action="store_true", help="replace an existing run folder of the same run.name")
    train.set_defaults(handler=_train)

    cache = commands.add_parser("cache", help="decode a dataset once into the decoded-image cache, ahead of training",
                                description="Decode every image once at the training size (same key=value "
                                            "settings as train), so that training starts at once.")
    cache.add_argument("data", help="folder, CSV manifest or packaged dataset")
    cache.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    cache.add_argument("-c", "--config", help="YAML config file")
    cache.set_defaults(handler=_cache)

    lr_find = commands.add_parser("lr-find", help="learning-rate range test: a plot and a suggested optim.lr",
                                  description="Train briefly while the learning rate grows from --start to --end "
                                              "and suggest optim.lr from the loss curve (same key=value settings "
                                              "as train). Writes <run.dir>/lr-find-*/lr_find.png.")
    lr_find.add_argument("data", help="folder, CSV manifest or packaged dataset")
    lr_find.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    lr_find.add_argument("-c", "--config", help="YAML config file")
    lr_find.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    lr_find.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    lr_find.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    lr_find.set_defaults(handler=_lr_find)

    evaluate = commands.add_parser("eval", help="metrics, per-class report, confusion matrix, predictions CSV")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluate.add_argument("--data", help="another dataset with the same class names (distribution shift)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object of metrics on stdout")
    evaluate.add_argument("--layer", help="module whose activation maps to draw (default: the Grad-CAM layer); "
                                          "an unknown name lists valid ones")
    evaluate.add_argument("--no-explain", action="store_true", help="skip Grad-CAM, activation maps and t-SNE")
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(handler=_eval)

    report = commands.add_parser("report", help="one self-contained report.html: curves, errors, calibration, Grad-CAM",
                                 description="Write runs/NAME/report.html (images embedded, opens from disk). "
                                             "Evaluates the split first when its Grad-CAM figure is missing.")
    report.add_argument("run", help="run folder")
    report.add_argument("--split", help="evaluated split or tag to report (default: test, else val)")
    report.add_argument("--out", help="where to write the HTML (default: RUN/report.html)")
    report.add_argument("--refresh", action="store_true", help="evaluate again even if the figures exist")
    report.add_argument("--layer", help="module for the activation maps (see imgcls eval --layer)")
    report.add_argument("--device", default="auto")
    report.set_defaults(handler=_report)

    predict = commands.add_parser("predict", help="top-k labels for image files, folders or globs")
    predict.add_argument("run", help="run folder or model.safetensors")
    predict.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    predict.add_argument("--out", help="write a CSV here (default: a table, or CSV when stdout is not a terminal)")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--reject", metavar="auto|CONFIDENCE",
                         help="answer 'unknown' below this confidence; auto: the threshold chosen on the validation "
                              "split for 95%% precision, stored in the model")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(handler=_predict)

    models = commands.add_parser("models", help="list model names (timm architectures and small_resnet)")
    models.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*'")
    models.set_defaults(handler=_models)

    datasets = commands.add_parser("datasets", help="list packaged datasets, or write one as an image folder")
    datasets.add_argument("name", nargs="?", help="dataset to materialise; prints its folder")
    datasets.set_defaults(handler=_datasets)
    return parser


def _stop_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # a scheduler's kill is an interruption: mark the run and keep last.ckpt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from imgcls.tracking import setup_logging

    setup_logging()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return args.handler(args)
    except ImgclsError as error:
        if args.debug:
            raise
        print(f"imgcls: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("imgcls: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"imgcls: unexpected {type(error).__name__}: {error} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
