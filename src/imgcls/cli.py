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
    from imgcls.training import train

    if args.resume:
        if args.data:
            raise ImgclsError("give either DATA or --resume RUN, not both")
        train(resume=args.resume, overrides=args.overrides)
        return 0
    config = load_config(args.config, _with_data_path(args))
    if not config.data.path:
        raise ImgclsError("no data: give DATA (a folder, a CSV, or fashion-mnist/digits) or data.path in the config")
    train(config, force=args.force)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from imgcls.config import load_config
    from imgcls.data import cache_dir
    from imgcls.data.cache import cache_entries, cache_folder, cached_paths, check_entry, remove_entry
    from imgcls.training import cache_dataset, resolve_data

    if not args.data and not (args.verify or args.clear):
        raise ImgclsError("give DATA to cache, or --verify / --clear for every entry of the cache folder")
    config = load_config(args.config, [f"data.path={args.data}", *args.overrides]) if args.data else None
    if args.verify or args.clear:
        if config is None:
            entries = cache_entries()
        else:  # the one entry that training with these settings reads
            config, source = resolve_data(config)
            entry = cache_folder(cached_paths(source.splits), config.data.image_size, config.data.resize)
            entries = [entry] if entry.is_dir() else []
        freed, corrupt = 0, 0
        for entry in entries:
            if args.clear:
                size = remove_entry(entry)
                print(f"removed  {entry} ({size:,} bytes)")
            elif problem := check_entry(entry, thorough=True):
                size, corrupt = remove_entry(entry), corrupt + 1
                print(f"corrupt  {entry}: {problem}; removed")
            else:
                size = 0
                print(f"ok       {entry}")
            freed += size
        outcome = (f"{len(entries) - corrupt} ok, {corrupt} corrupt (removed)" if args.verify
                   else f"{len(entries)} removed")
        print(f"cache entries in {cache_dir() / 'decoded'}: {outcome}; {freed:,} bytes freed")
        if config is None or args.clear:
            return 0
    config, count = cache_dataset(config)  # builds the entry when it is missing or was corrupt
    log.info(f"{count} images decoded at {config.data.image_size} px ({config.data.resize}) for "
             f"model.name={config.model.name}, in {cache_dir() / 'decoded'}; `imgcls train` with the same "
             "settings starts from it")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from imgcls.config import load_config
    from imgcls.doctor import failures, parse_fail_on, run_doctor, summary_lines

    fail_on = parse_fail_on(args.fail_on)  # a typo fails before minutes of checks
    config = load_config(args.config, _with_data_path(args))
    if not config.data.path:
        raise ImgclsError("no data: give DATA (a folder, a CSV, or fashion-mnist/digits) or data.path in the config")
    report, folder = run_doctor(config, labels=args.labels, from_cv=args.from_cv, name=args.name, force=args.force)
    out = sys.stderr if args.json else sys.stdout
    for line in summary_lines(report):
        print(line, file=out)
    print(f"wrote {folder / 'doctor.html'}, doctor.json and cleaned.csv (train on it: imgcls train "
          f"{folder / 'cleaned.csv'})", file=out)
    if args.json:
        print(json.dumps(report, indent=1))
    failed = failures(report, fail_on)
    if failed:
        print(f"imgcls doctor: failing on {', '.join(sorted({f['fail_kind'] for f in failed}))} (--fail-on)",
              file=sys.stderr)
        return 1
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
    from imgcls.evaluation import evaluate

    metrics = evaluate(args.run, split=args.split, data=args.data, device=args.device, quiet=args.json,
                       explain=not args.no_explain, layer=args.layer, tta=args.tta)
    if args.json:
        print(json.dumps(metrics))
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ImgclsError(f"--seeds {text}: give integers separated by commas, e.g. --seeds 42,123,777") from None


def _with_data_path(args: argparse.Namespace) -> list[str]:
    """The overrides, led by data.path=DATA when DATA is given (else a config file gives data.path)."""
    return [f"data.path={args.data}", *args.overrides] if args.data else list(args.overrides)


def _sweep(args: argparse.Namespace) -> int:
    from imgcls.sweeps import sweep

    sweep(args.config, _with_data_path(args), _seeds(args.seeds), name=args.name, jobs=args.jobs, resume=args.resume,
          verbose=args.verbose)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from imgcls.sweeps import cross_validate

    if not args.data and not args.resume:
        raise ImgclsError("imgcls cv needs DATA (a folder, CSV or packaged dataset), or --resume FOLDER")
    cross_validate(args.data, args.config, args.overrides, folds=args.folds, name=args.name, jobs=args.jobs,
                   resume=args.resume, verbose=args.verbose)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from imgcls.sweeps import tune

    index, _, count = args.worker.partition("/")
    tune(args.data, args.config, args.overrides, trials=args.trials, space_file=args.space, name=args.name,
         jobs=args.jobs, resume=args.resume, verbose=args.verbose, worker=(int(index), int(count or 1)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from imgcls.comparison import compare

    result = compare(args.runs, split=args.split, csv_path=args.csv, markdown_path=args.markdown,
                     ignore=args.ignore or (), quiet=args.json)
    if args.json:
        print(json.dumps(result))
    for path in result["files"]:
        log.info(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import csv

    from imgcls.evaluation import evaluate
    from imgcls.report import write_report
    from imgcls.tracking import RunFolder

    run, folder = Path(args.run), RunFolder(args.run)
    if not folder.config.is_file():
        raise ImgclsError(f"{run} is not a run folder (no config.yaml); give runs/NAME")
    split = args.split
    if split is None:  # training's choice: test, or val for data without a test split
        with open(folder.splits, newline="") if folder.splits.is_file() else open(os.devnull) as handle:
            splits = {row["split"] for row in csv.DictReader(handle)}
        split = RunFolder.final_split(splits)
    own_split = "_" not in split  # "<folder>_<split>" tags come from `imgcls eval --data`, which must be re-run
    if own_split and (args.refresh or not (run / f"gradcam_{split}.png").is_file()):
        log.info(f"evaluating {split} with explanations (Grad-CAM, activation maps, t-SNE) for the report")
        evaluate(run, split=split, device=args.device, quiet=True, layer=args.layer)
    path = write_report(run, split, args.out)
    log.info(f"report: {path}  (self-contained: open it in any browser, share the one file)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from imgcls.prediction import expand_paths, load, write_predictions_csv

    classifier = load(args.run, args.device)
    paths = expand_paths(args.paths)
    rows = classifier.predict(paths, topk=args.topk, reject=args.reject, tta=args.tta, threshold=args.threshold)
    topk = max(1, min(args.topk, len(classifier.class_names)))
    failed = sum(1 for row in rows if row["error"])
    if failed == len(rows):  # nothing to write: a script must see the failure in the exit code
        raise ImgclsError(f"none of the {len(rows)} files could be read (e.g. {rows[0]['path']}: {rows[0]['error']}); "
                          "give image files (JPEG, PNG, WebP, BMP, TIFF or GIF)")
    if args.out:
        write_predictions_csv(args.out, rows, topk, classifier)
        log.info(f"wrote {len(rows)} predictions to {args.out}" + (f" ({failed} unreadable)" if failed else ""))
    elif sys.stdout.isatty():
        _print_predictions(rows)
    else:  # piped: CSV on stdout
        write_predictions_csv(sys.stdout, rows, topk, classifier)
    if failed:
        log.warning(f"{failed} of {len(rows)} files could not be read; see the error column")
    if args.reject:
        from imgcls.prediction import UNKNOWN

        rejected = sum(1 for row in rows if row["label"] == UNKNOWN)
        log.info(f"{rejected} of {len(rows)} answered '{UNKNOWN}' (confidence below "
                 f"{classifier.reject_threshold(args.reject):.3f})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from imgcls.exporting import FORMATS, export

    formats = FORMATS if args.format == "all" else (args.format,)
    result = export(args.run, formats=formats, out=args.out, int8=args.int8)
    if args.json:
        print(json.dumps(result))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from imgcls.serving import serve

    serve(args.model, host=args.host, port=args.port, engine=args.engine, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms)
    return 0


def _print_predictions(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if rows and "labels" in rows[0]:  # multi-label
        table = Table("path", "labels", "probabilities", "error")
        for row in rows:
            values = sorted(((value, key.removeprefix("prob_")) for key, value in row.items() if key.startswith("prob_")),
                            reverse=True)
            table.add_row(row["path"], row["labels"] or "(none)", ", ".join(f"{name} {value:.2f}" for value, name in values[:5]),
                          row["error"])
        Console().print(table)
        return
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


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its options, DATA and key=value overrides go in any order
    (`imgcls sweep DATA --seeds 1,2 train.epochs=1`). Plain argparse fills all positionals from the first
    run of positional words, so a key=value after an option is "unrecognized"; parse_intermixed_args does
    not, but refuses a parser with subcommands: so each subcommand's parser intermixes the words the top
    parser hands it. DATA is then the first positional that is not key=value (a config file or --resume
    may give it instead)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args parses through this method (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        if hasattr(namespace, "overrides"):
            words = [word for word in (namespace.data, *namespace.overrides) if word is not None]
            namespace.data = next((word for word in words if "=" not in word), None)
            if namespace.data is not None:
                words.remove(namespace.data)
            elif any(action.dest == "data" and action.required for action in self._actions):
                self.error("the following arguments are required: data")
            namespace.overrides = words
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description="Train, evaluate and use image classifiers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    train = commands.add_parser("train", help="train a model; creates runs/<name>/",
                                description="Train a model. Config keys are set with key=value (e.g. train.epochs=5).")
    train.add_argument("data", nargs="?", help="folder, CSV manifest or packaged dataset (fashion-mnist, digits)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("-c", "--config", help="YAML config file (e.g. runs/NAME/config.yaml)")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--force", action="store_true", help="replace an existing run folder of the same run.name")
    train.set_defaults(handler=_train)

    def add_data_arguments(command: argparse.ArgumentParser) -> None:
        """DATA, key=value overrides and -c CONFIG, read as `imgcls train` reads them."""
        command.add_argument("data", nargs="?", help="folder, CSV manifest or packaged dataset")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
        command.add_argument("-c", "--config", help="YAML config file")

    cache = commands.add_parser("cache", help="decode a dataset once into the decoded-image cache; verify or clear it",
                                description="Decode every image once at the training size (same key=value "
                                            "settings as train), so that training starts at once. --verify and "
                                            "--clear act on the entry for DATA at these settings, or without DATA "
                                            "on every entry of the cache folder.")
    add_data_arguments(cache)
    action = cache.add_mutually_exclusive_group()
    action.add_argument("--verify", action="store_true",
                        help="hash every byte and compare with the hashes recorded at build time; report each "
                             "entry ok or corrupt, remove corrupt ones (and build DATA's again)")
    action.add_argument("--clear", action="store_true", help="remove the entries and report the bytes freed")
    cache.set_defaults(handler=_cache)

    doctor = commands.add_parser("doctor", help="check a dataset: unreadable files, copies and leakage across splits, "
                                                "class balance, label issues; doctor.html + doctor.json",
                                 description="Read DATA as imgcls train would (same key=value settings, same splits) "
                                             "and report what is wrong with it, worst first. Writes "
                                             "<run.dir>/doctor/NAME/doctor.json, doctor.html and cleaned.csv (a "
                                             "manifest without training copies of validation and test images).")
    add_data_arguments(doctor)
    doctor.add_argument("--labels", action="store_true",
                        help="also look for wrong labels (cleanlab on out-of-fold predictions of a quick k-fold on "
                             "image embeddings) and outliers")
    doctor.add_argument("--from", dest="from_cv", metavar="CV_FOLDER",
                        help="judge the labels (implies --labels) by the out-of-fold predictions of an imgcls "
                             "cv folder instead of the quick k-fold on image embeddings")
    doctor.add_argument("--json", action="store_true", help="print doctor.json on stdout (the summary goes to stderr)")
    doctor.add_argument("--fail-on", metavar="KINDS",
                        help="exit with 1 when any of these is found (comma-separated: leakage, conflicts, "
                             "unreadable, duplicates, label-issues, imbalance), for CI pipelines")
    doctor.add_argument("--name", help="folder name under <run.dir>/doctor/ (default: the data's name, -2, -3, ...)")
    doctor.add_argument("--force", action="store_true", help="replace the folder of the same --name")
    doctor.set_defaults(handler=_doctor)

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
    evaluate.add_argument("--tta", nargs="?", const="flip", choices=("flip", "crops"),
                          help="also evaluate with test-time augmentation: the image and its mirror (flip, the "
                               "default), plus 4 shifted crops (crops); metrics with and without")
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(handler=_eval)

    def add_many_runs_flags(command: argparse.ArgumentParser, kind: str) -> None:
        command.add_argument("data", nargs="?", help="folder, CSV manifest or packaged dataset")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
        command.add_argument("-c", "--config", help="YAML config file")
        command.add_argument("--name", help=f"folder name under runs/{kind}/ (the same name again resumes it)")
        command.add_argument("--resume", metavar="FOLDER", help=f"continue an interrupted {kind[:-1] if kind.endswith('s') else kind}")
        command.add_argument("--jobs", type=int, default=1,
                             help="runs in parallel processes, each on its own CPU cores / GPU (default 1)")
        command.add_argument("--verbose", action="store_true",
                             help="show every run's full log (default: one line per run; each log.txt has it all)")

    sweep = commands.add_parser("sweep", help="a config x a grid of values x seeds; then the comparison table",
                                description="Every combination of the grid (key=a,b,c) and seed is a run folder in "
                                            "runs/sweeps/NAME/; running it again resumes. Ends with imgcls compare.")
    add_many_runs_flags(sweep, "sweeps")
    sweep.add_argument("--seeds", default="42,123,777", help="comma-separated seeds (default 42,123,777)")
    sweep.set_defaults(handler=_sweep)

    cv = commands.add_parser("cv", help="stratified k-fold cross-validation with out-of-fold predictions",
                             description="A run per fold in runs/cv/NAME/ (train on K-1 folds, validate on one); "
                                         "mean ± std over folds; oof_predictions.csv for every training image.")
    add_many_runs_flags(cv, "cv")
    cv.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    cv.set_defaults(handler=_cv)

    tune = commands.add_parser("tune", help="hyper-parameter search with Optuna (TPE, pruning), resumable",
                               description="Optuna TPE search with median pruning on the per-epoch validation "
                                           "metric; the study is runs/tune/NAME/study.db; writes best_config.yaml.")
    add_many_runs_flags(tune, "tune")
    tune.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    tune.add_argument("--space", help="search space YAML (default: lr, weight decay, label smoothing, augment)")
    tune.add_argument("--worker", default="0/1", help=argparse.SUPPRESS)  # I/N: a process started by --jobs N
    tune.set_defaults(handler=_tune)

    compare = commands.add_parser("compare", help="mean ± std per configuration, and whether the best two differ",
                                  description="Group runs by configuration (seeds apart): n, mean ± std of test "
                                              "top-1, top-5, loss, macro-F1, ECE; paired bootstrap and McNemar test "
                                              "between the two best configurations.")
    compare.add_argument("runs", nargs="+", help="run folders, sweep folders or any folder holding runs")
    compare.add_argument("--split", default="test", help="evaluated split to compare (default test)")
    compare.add_argument("--csv", help="write the table as CSV here")
    compare.add_argument("--markdown", help="write the table and the statement as Markdown here")
    compare.add_argument("--ignore", action="append", metavar="KEY",
                         help="a config key that does not make a different configuration (repeatable), "
                              "e.g. data.path to compare the folds of a cv folder as repeats")
    compare.add_argument("--json", action="store_true", help="print the groups and the paired test as JSON")
    compare.set_defaults(handler=_compare)

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
    predict.add_argument("run", help="run folder, model.safetensors, or model.onnx (from imgcls export; "
                                     "needs only onnxruntime)")
    predict.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    predict.add_argument("--out", help="write a CSV here (default: a table, or CSV when stdout is not a terminal)")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--reject", metavar="auto|CONFIDENCE",
                         help="answer 'unknown' below this confidence; auto: the threshold chosen on the validation "
                              "split for 95%% precision, stored in the model")
    predict.add_argument("--threshold", type=float, metavar="PROBABILITY",
                         help="multi-label models: answer every label whose probability reaches this (default: each "
                              "label's threshold chosen on the validation split, stored in the model)")
    predict.add_argument("--tta", nargs="?", const="flip", choices=("flip", "crops"),
                         help="average the probabilities of the image and its mirror (flip, the default), plus 4 "
                              "shifted crops (crops); a model trained with data.horizontal_flip=false is never "
                              "mirrored")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="ONNX / torch.export files, checked against the PyTorch model",
                                 description="Write RUN/export/model.onnx (uint8 RGB NCHW in; probabilities and "
                                             "logits out; class names and preprocessing in its metadata) and/or "
                                             "model.pt2 (torch.export), each compared with the PyTorch model on up "
                                             "to 1,000 test images; the figures go to export.json.")
    export.add_argument("run", help="run folder")
    export.add_argument("--format", default="onnx", choices=("onnx", "pt2", "all"), help="default onnx")
    export.add_argument("--out", help="folder for the files (default RUN/export)")
    export.add_argument("--int8", action="store_true",
                        help="also model.int8.onnx: static int8 quantization (QDQ, per-channel) calibrated on "
                             "training images; its test accuracy is measured against fp32")
    export.add_argument("--json", action="store_true", help="print export.json on stdout")
    export.set_defaults(handler=_export)

    serve = commands.add_parser("serve", help="HTTP API (POST /predict) and an upload page at /",
                                description="Serve a run's model or an exported model.onnx: POST /predict "
                                            "(multipart field 'file', one or more images), GET /health, "
                                            "/metadata, /docs, and an upload page at /.")
    serve.add_argument("model", help="run folder, model.safetensors or model.onnx")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0: all")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--engine", default="auto", choices=("auto", "onnx", "torch"),
                       help="auto: ONNX Runtime (a run is exported in memory at start), torch without onnxruntime")
    serve.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=0.0,
                       help="how long a batch's first image may wait for more (default 0: a batch is what "
                            "arrived while the previous one ran)")
    serve.set_defaults(handler=_serve)

    models = commands.add_parser("models", help="list model names (timm architectures, small_resnet and small_convnet)")
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


def run() -> None:
    """The `imgcls` command: `main`, then exit with its code. An interrupted command (130) has unwound by
    then (checkpoint, summary.json and the loggers closed): it leaves without the interpreter's teardown,
    where twice in CI a training process interrupted by SIGTERM stayed busy for minutes after printing
    "imgcls: interrupted" (threads idle, the main one running; not reproduced locally in a dozen tries)."""
    code = main()
    if code == 130:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
