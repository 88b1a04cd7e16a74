"""The ``recsys-hnm`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data import DataError, copurchase_graph, describe_graph, load_dataset, load_table
from .ops.io import atomic_write, check_writable
from .ops.logs import configure_logging
from .tracking import Terminated, TrackingError


def _describe(args) -> int:
    target = Path(args.dataset)
    if target.is_file():
        data = load_table(target, items_path=args.items, unknown_items=args.unknown_items)
    else:
        data = load_dataset(args.dataset, unknown_items=args.unknown_items)
    info = data.describe()
    source = args.copurchase_source or ("basket" if data.has_baskets else "session" if data.has_time else "history")
    graph = copurchase_graph(data.events, data.n_items, source=source, min_count=args.min_count)
    info["copurchase"] = {"source": source, "min_count": args.min_count, **describe_graph(graph)}
    print(json.dumps(info, indent=2))
    return 0


def _profile(args) -> int:
    from .data.profile import describe_profile, profile_split, suggest_settings
    from .experiment import load_data

    overrides = list(args.set or [])
    for key in ("train", "valid", "test", "items"):
        if getattr(args, key):
            overrides.append(f"data.{key}={getattr(args, key)}")
    if args.train:
        overrides.append("data.dataset=null")
    _, split = load_data(load_config(args.config or "pipelines/quickstart.yaml", overrides))
    profiles = {phase: profile_split(split, phase) for phase in ("valid", "test")}
    suggested = {k: [v for v, _ in opts] for k, opts in suggest_settings(profiles["valid"]).items()}
    if args.json:
        print(json.dumps({"valid": profiles["valid"].as_dict(), "test": profiles["test"].as_dict(), "auto": suggested}, indent=2))
        return 0
    for phase, p in profiles.items():
        print(f"== held out: {phase}\n{describe_profile(p)}")
    print("== 'auto' candidates (the rule's pick first), from validation:")
    print("\n".join(f"  {k}: {v}" for k, v in suggested.items()))
    return 0


def _train(args) -> int:
    from .training.distributed import shutdown
    from .experiment import summary_json, train

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, not {args.nproc}")
    overrides = list(args.set or [])
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.register:
        overrides.append(f"tracking.register={json.dumps(args.register)}")
    external = {"train": args.train, "valid": args.valid, "test": args.test, "items": args.items}
    for key, value in external.items():
        if value:
            overrides.append(f"data.{key}={value}")
    if args.train:
        overrides.append("data.dataset=null")
    config = load_config(args.config, overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .experiment.run import check_shardable
        from .training.distributed import SHARDED_DEVICE

        check_shardable(config, SHARDED_DEVICE)  # once, here, not once per rank after the launch
        return _torchrun(args.nproc, args.argv)
    try:
        result = train(config, resume=args.resume)
    finally:
        shutdown()
    if result.test:  # rank 0 (or the only process): the others report nothing
        print("\n".join(result.summary))
        print(summary_json(result))
        print(f"run_id={result.run_id}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """This same command, without --nproc, as ``nproc`` processes on this host under torchrun
    (its exit code: non-zero when any rank failed; torchrun then stops the others)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "recsys_hnm.cli", *rest]
    return subprocess.call(cmd)


def _evaluate(args) -> int:
    from .experiment import evaluate_run

    print(json.dumps(evaluate_run(args.run_id, args.tracking_uri), indent=2))
    return 0


def _recommend(args) -> int:
    from .data import read_table
    from .experiment import recommend, write_table

    check_writable(args.output, (".csv", ".parquet"))  # before loading and scoring, not after
    users = None
    if args.users:
        frame = read_table(args.users)
        if "user_id" not in frame.columns:
            raise DataError(f"{args.users}: needs a user_id column; columns present: {list(frame.columns)}")
        if not len(frame):
            raise DataError(f"--users {args.users}: the file has no rows (only a header): no users to recommend for")
        users = frame["user_id"].to_numpy()
    out = recommend(args.run_id, args.k, users, args.tracking_uri, history=args.history, exclude=args.exclude)
    write_table(out, args.output)
    print(f"wrote {len(out)} rows for {out['user_id'].nunique()} users to {args.output}")
    return 0


def _mine(args) -> int:
    from .experiment.offline import MINE_SOURCES, mine

    if args.per_positive < 1:
        raise ValueError(f"--per-positive must be >= 1, not {args.per_positive}")
    sources = tuple(s.strip() for s in args.sources.split(","))
    unknown = [s for s in sources if s not in MINE_SOURCES]
    if unknown or len(set(sources)) != len(sources):
        raise ValueError(f"--sources {args.sources!r}: give distinct sources among {list(MINE_SOURCES)}"
                         + (f", not {unknown}" if unknown else ""))
    lo, hi = args.window
    if "ann" in sources and not 0 <= lo < hi:
        raise ValueError(f"--window {lo} {hi}: must be 0 <= LO < HI")
    n = mine(args.run_id, args.output, sources=sources, per_positive=args.per_positive,
             window=tuple(args.window), overwrite=args.force, uri=args.tracking_uri, seed=args.seed)
    print(f"wrote {n} mined negatives to {args.output}")
    return 0


def _compare(args) -> int:
    if args.by_history and not args.experiment:
        raise ValueError("--by-history groups the finished runs of an experiment: give it with --experiment, not --spec")
    if args.experiment:
        return _compare_experiment(args)
    return _run_pipeline(args.spec, args)  # a spec: run what is not done yet, then tabulate


def _baseline(args) -> int:
    from .experiment import run_baseline

    overrides = list(args.set or [])
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    config = load_config(args.config, overrides)
    result = run_baseline(config, args.name)
    at = [f"{m}@{k}" for k in config.eval.ks[:1] for m in ("ndcg", "map")]
    print(json.dumps({"params": result["params"], **{phase: {m: round(result[phase][m], 4) for m in at} for phase in ("valid", "test")}}))
    print(f"run_id={result['run_id']}")
    return 0


def _pipeline(args) -> int:
    return _run_pipeline(args.spec, args)


def _run_pipeline(spec_path: str, args) -> int:
    from .studies.compare import ComparisonSpec
    from .studies.pipeline import run_pipeline

    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (variants run in parallel processes), not {workers}")
    if args.output:  # before hours of training, not after
        check_writable(args.output, (".md", ".txt"))
    spec = ComparisonSpec.load(spec_path, getattr(args, "seeds", None))
    summary = run_pipeline(spec, args.tracking_uri, workers=workers, dry_run=getattr(args, "dry_run", False),
                           baseline=args.baseline, output=args.output, only=getattr(args, "only", None))
    if "to_run" in summary:
        print(f"{len(summary['planned'])} jobs, {len(summary['skipped'])} already finished; would run:")
        print("\n".join(f"  {key}" for key in summary["to_run"]))
        for out in summary.get("to_mine", []):
            print(f"  would mine {out} from the run {spec.mined[out]['from']}, after it and before the variants")
        return 0
    print(summary["table"])
    print(f"ran {len(summary['ran'])}, skipped {len(summary['skipped'])} already finished, failed {len(summary['failed'])}"
          + (f": {summary['failed']} (run the pipeline again to retry them)" if summary["failed"] else ""))
    return 1 if summary["failed"] else 0


def _compare_experiment(args) -> int:
    from .studies.compare import check_metric, compare_runs, comparison_markdown, experiment_runs, plot_validation, table_metrics

    if args.output:
        check_writable(args.output, (".md", ".csv"))
    records = experiment_runs(args.experiment, args.tracking_uri)
    check_metric(records, args.metric, "--metric")  # with or without --baseline: before the table, not a KeyError in it
    if args.by_history:
        from .studies.compare import by_history, by_history_markdown

        frame = by_history(records, args.by_history, args.metric, args.baseline)
        variants = sorted({r.variant for r in records}, key=lambda v: (v != args.baseline, v))
        text = by_history_markdown(frame, variants, args.metric, args.baseline)
    else:
        frame = compare_runs(records, args.metric, args.baseline, metrics=table_metrics(records))
        text = comparison_markdown(frame, table_metrics(records), baseline=args.baseline, metric=args.metric)
    print(text)
    if args.output:
        out = Path(args.output)
        if out.suffix == ".csv":
            atomic_write(out, lambda tmp: frame.to_csv(tmp, index=False))
        else:
            atomic_write(out, lambda tmp: Path(tmp).write_text(text + "\n"))
        if not args.by_history:
            plot_validation(records, out.with_suffix(".png"), args.metric, args.tracking_uri)
    return 0


def _register_name(value: str) -> str:
    """--register NAME, refused at parsing (before any run) when MLflow's registry would refuse it."""
    from .config import check_register_name

    try:
        check_register_name(value, "--register")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--register: ")) from None
    return value


# size: a declaration of every subcommand and flag, read top to bottom as the CLI's reference
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-hnm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (before the command: recsys-hnm -v train ...)")
    commands = parser.add_subparsers(dest="command", required=True)

    datasets = commands.add_parser("datasets", help="inspect datasets")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    describe = dsub.add_parser("describe", help="sizes, density, categories, time range, co-purchase statistics")
    describe.add_argument("dataset", help="a shipped dataset name (ml-latest-small), a MovieLens folder, or an events CSV/parquet")
    describe.add_argument("--items", help="item metadata file (item_id,category) for an events file")
    describe.add_argument("--unknown-items", default="error", choices=["error", "unknown_category"])
    describe.add_argument("--copurchase-source", choices=["basket", "session", "history"])
    describe.add_argument("--min-count", type=int, default=1)
    describe.set_defaults(func=_describe)
    profile = dsub.add_parser("profile", help="how the split's held-out events sit against the histories, and the 'auto' settings it suggests")
    profile.add_argument("--config", help="experiment YAML whose data section gives the split (default: pipelines/quickstart.yaml)")
    profile.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. data.split=ratio")
    profile.add_argument("--train", help="external training events (CSV/parquet: user_id,item_id,timestamp)")
    profile.add_argument("--valid", help="external validation events")
    profile.add_argument("--test", help="external test events")
    profile.add_argument("--items", help="item metadata (item_id,category)")
    profile.add_argument("--json", action="store_true", help="the profiles and suggestions as JSON")
    profile.set_defaults(func=_profile)

    train = commands.add_parser("train", help="train, evaluate and track one experiment; prints run_id=<id> last")
    train.add_argument("--config", default="pipelines/quickstart.yaml", help="experiment YAML (default: %(default)s)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5")
    train.add_argument("--train", help="external training events (CSV/parquet: user_id,item_id,timestamp)")
    train.add_argument("--valid", help="external validation events")
    train.add_argument("--test", help="external test events")
    train.add_argument("--items", help="item metadata (item_id,category; several categories separated by |)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_ID",
                       help="continue a run from its checkpoint: RUN_ID, or without it the most recently checkpointed run of this config's name")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--register", metavar="NAME", type=_register_name,
                       help="register the logged recommender (MLflow pyfunc) in the model registry")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train on N processes of this host: data parallel, embedding tables sharded by TorchRec "
                            "(the same as torchrun --nproc_per_node N -m recsys_hnm.cli train ...)")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="test metrics of a run, as JSON")
    evaluate.add_argument("--run-id", required=True)
    evaluate.add_argument("--tracking-uri")
    evaluate.set_defaults(func=_evaluate)

    rec = commands.add_parser("recommend", help="top-K items per user from a run (by default never an item the user has)")
    rec.add_argument("--run-id", required=True)
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--output", required=True, help="CSV or parquet (user_id,item_id,rank,score)")
    rec.add_argument("--users", help="CSV/parquet with a user_id column (default: every user with test items)")
    rec.add_argument("--history", choices=["test", "all"], default="test", help=(
        "test (default): the test-phase view used for offline evaluation, the user tower's history and the "
        "masked items are train + validation; all: the serving view, every known event of the user, test "
        "included, is both the tower's history and masked"))
    rec.add_argument("--exclude", choices=["history", "train", "none"], help=(
        "what is never recommended (default: the run's eval.exclude): history, the items of that history; "
        "train, the training items; none, nothing: items the user has may come back (repeat purchases)"))
    rec.add_argument("--tracking-uri")
    rec.set_defaults(func=_recommend)

    mine = commands.add_parser("mine", help="offline mining: hard negatives per training (user, positive) of a run, to a file")
    mine.add_argument("--run-id", required=True)
    mine.add_argument("--output", required=True, help="parquet or CSV: user_id,item_id,negative_id,source,rank,score")
    mine.add_argument("--sources", default="ann", help="comma-separated, among ann, category, copurchase (default: %(default)s)")
    mine.add_argument("--per-positive", type=int, default=10, help="negatives per positive, split over the sources (default: %(default)s)")
    mine.add_argument("--window", type=int, nargs=2, default=[10, 100], metavar=("LO", "HI"),
                      help="ann: the user's ranks [LO, HI) of the run's model, known items left out (default: 10 100)")
    mine.add_argument("--seed", type=int, default=0)
    mine.add_argument("--force", action="store_true", help="replace an existing output file")
    mine.add_argument("--tracking-uri")
    mine.set_defaults(func=_mine)

    baseline = commands.add_parser("baseline", help="a strong simple baseline on a config's data: tuned on validation, one MLflow run")
    baseline.add_argument("--name", required=True, choices=["mostpop", "itemknn", "ease", "als", "repeatpop", "tifuknn"])
    baseline.add_argument("--config", default="pipelines/quickstart.yaml", help="its data, split, eval and tracking (default: %(default)s)")
    baseline.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    baseline.add_argument("--tracking-uri")
    baseline.set_defaults(func=_baseline)

    pipeline = commands.add_parser("pipeline", help="batch pipelines: variants x seeds and baselines as MLflow child runs")
    psub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    prun = psub.add_parser("run", help="run what is not yet finished (FAILED and interrupted jobs run again), then tabulate")
    prun.add_argument("spec", help="pipeline YAML (name, base, seeds, set, variants, baselines)")
    prun.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    prun.add_argument("--workers", type=int, default=1, help="variants in parallel processes (default: %(default)s)")
    prun.add_argument("--baseline", help="variant to compare against (paired bootstrap CI over test users)")
    prun.add_argument("--only", action="append", metavar="NAME",
                      help="run only this variant or baseline of the spec (repeatable); the table still covers every finished run")
    prun.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                      help="run these seeds instead of the spec's (the table still covers every finished run)")
    prun.add_argument("--output", help="also write the table here (.md/.txt) and the validation curves beside it (.png)")
    prun.add_argument("--tracking-uri")
    prun.set_defaults(func=_pipeline)

    compare = commands.add_parser("compare", help="variants of a config over several seeds: MLflow runs and a table")
    source = compare.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="a pipeline YAML: the same as `pipeline run SPEC`")
    source.add_argument("--experiment", help="tabulate the finished runs of this MLflow experiment (no training)")
    compare.add_argument("--metric", default="ndcg@10", help="metric of the paired comparison (default: %(default)s)")
    compare.add_argument("--baseline", help="variant to compare against: relative change with a paired 95%% bootstrap CI over test users")
    compare.add_argument("--by-history", type=int, nargs="+", metavar="EDGE",
                         help="with --experiment: the table per group of test users by history (distinct items before test), "
                              "groups up to each EDGE and above the last, e.g. 4 5 7 10 20")
    compare.add_argument("--output", help="write the table here (.md, or .csv with --experiment) and the validation curves beside it (.png)")
    compare.add_argument("--tracking-uri")
    compare.set_defaults(func=_compare)
    return parser


KNOWN_ERRORS = (DataError, ConfigError, TrackingError, FileNotFoundError, FileExistsError, ValueError)  # exit 2: bad input
LOG_DIR_ENV = "RECSYS_HNM_LOG_DIR"  # where a failed command's traceback goes (default: mlruns/logs, else a temp dir)


def main(argv: list[str] | None = None) -> int:
    """The CLI boundary: whatever escapes a command ends as one line on stderr and an exit code
    (2: bad input; 1: an unexpected error, its traceback in a log file, on screen with -v;
    130: Ctrl-C, at any moment; 143: SIGTERM)."""
    verbose = False
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv)
        args.argv = argv
        verbose = args.verbose
        configure_logging(verbose)
        return args.func(args)
    except KNOWN_ERRORS as e:
        if verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:  # the run is already marked KILLED
        print(f"interrupted ({type(e).__name__})", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except Exception as e:  # noqa: BLE001 - the boundary: no raw traceback reaches the user
        return _unexpected(e, argv, verbose)


def _one_line(text: str, limit: int = 1000) -> str:
    """A message as one line: its lines joined, cut at ``limit`` characters."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _unexpected(e: BaseException, argv: list[str] | None, verbose: bool) -> int:
    """One line: the command, the exception's type and message, where it was raised, and the log
    file that holds the full traceback (printed too with -v)."""
    import traceback as tb

    text = "".join(tb.format_exception(type(e), e, e.__traceback__))
    if verbose:
        print(text, file=sys.stderr, end="")
    frames = tb.extract_tb(e.__traceback__)
    ours = [f for f in frames if f"{os.sep}recsys_hnm{os.sep}" in f.filename] or frames
    where = [f"at {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}"] if ours else []
    command = " ".join(a for a in (argv or [])[:2] if not a.startswith("-")) or "recsys-hnm"
    log = _write_log(text, argv)
    where += [f"full traceback in {log}"] if log else ["no log file could be written; -v prints the traceback"]
    message = _one_line(str(e), 500)
    print(f"error: {command} failed: {type(e).__name__}{': ' + message if message else ''} ({'; '.join(where)})", file=sys.stderr)
    return 1


def _write_log(text: str, argv: list[str] | None) -> str | None:
    """``text`` (a traceback) to $RECSYS_HNM_LOG_DIR, mlruns/logs, or else the temp dir, as
    recsys-hnm-<timestamp>-<pid>.log; its path, or None when none of them is writable."""
    import tempfile
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"recsys-hnm-{stamp}-{os.getpid()}.log"
    body = f"recsys-hnm {' '.join(argv or [])}\n{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n{text}"
    env = os.environ.get(LOG_DIR_ENV)
    for folder in ([env] if env else []) + [os.path.join("mlruns", "logs"), os.path.join(tempfile.gettempdir(), "recsys-hnm-logs")]:
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "a", encoding="utf-8") as f:
                f.write(body)
            return path
        except OSError:
            continue
    return None


def exit_worker(code: int) -> None:
    """End a torchrun worker without C++ static destructors: at interpreter exit, after the
    run and the process group are closed, a rank now and then aborts in them (SIGABRT,
    "terminate called without an active exception", about 1 run in 20 here), and torchrun
    then stops the other ranks mid-way, rank 0 while it logs the model."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_worker(code)
    sys.exit(code)
