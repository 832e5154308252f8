"""The command line: `python -m services ...` (see docs/DESIGN.md, "CLI").

Exit 0 on success; 2 with one line on stderr for a user error; 1 for an internal fault.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import os
import sys

from services.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors are user errors too: one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m services", description="Compression Explorer services")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    worker = sub.add_parser("worker", help="run the background service")
    worker.add_argument("--once", action="store_true", help="drain the queue, then exit")
    sub.add_parser("hash-password", help="read a team password from stdin (or a prompt) and print the "
                                         "EXPLORER_PASSWORD_HASH for it")

    models = sub.add_parser("models").add_subparsers(dest="action", required=True, parser_class=_Parser)
    models.add_parser("list").add_argument("--json", action="store_true")
    model_import = models.add_parser("import", help="import your own model: an .onnx file, a .zip or folder "
                                                    "(ONNX, or a Hugging Face folder), or hf:OWNER/NAME")
    model_import.add_argument("source")
    model_import.add_argument("--name")
    model_import.add_argument("--task")
    model_import.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,…",
                              help="fix the dynamic dimensions of an ONNX input (repeat for each input)")
    model_import.add_argument("--dataset", help="score it on one of your data sets (see `data list`)")
    model_import.add_argument("--json", action="store_true")
    prepare = models.add_parser("prepare")
    prepare.add_argument("id")
    prepare.add_argument("--wait", action="store_true")
    prepare.add_argument("--json", action="store_true")

    methods = sub.add_parser("methods").add_subparsers(dest="action", required=True, parser_class=_Parser)
    methods.add_parser("list").add_argument("--json", action="store_true")

    compress = sub.add_parser("compress")
    compress.add_argument("--model", required=True)
    compress.add_argument("--recipe", required=True, help="a JSON/YAML file or inline JSON")
    compress.add_argument("--wait", action="store_true")
    compress.add_argument("--json", action="store_true")

    search = sub.add_parser("search", help="how far a compression rate can go within an allowed score drop")
    search.add_argument("--model", required=True)
    search.add_argument("--recipe", default="{}", help="the base recipe (JSON/YAML file or inline JSON); the "
                        "rate's step is added first when the recipe lacks it")
    search.add_argument("--rate", action="append", help="the parameter to move, e.g. prune.structured.amount; "
                        "repeat it to move several at once (searched with Optuna); leave it out and the search "
                        "chooses among the methods that apply")
    search.add_argument("--goal", choices=("max-drop", "front", "size", "speed"), default="max-drop",
                        help="max-drop: the most compression within --max-drop (default); front: the Pareto front "
                             "of score against size; size: the best score under --max-mb; speed: the best score "
                             "at least --min-speedup times faster")
    search.add_argument("--max-mb", type=float, help="with --goal size: the largest ONNX file accepted, in MB")
    search.add_argument("--min-speedup", type=float, help="with --goal speed: how many times faster at batch 1")
    search.add_argument("--max-drop", type=float, help="score points the result may lose")
    search.add_argument("--budget", type=int, default=7, help="trials at most (default 7)")
    search.add_argument("--minutes", type=float, help="a time budget: no new trial after it (the best measured wins)")
    search.add_argument("--task", help="the task to score on (default: the model's own)")
    search.add_argument("--show", metavar="SEARCH_ID", help="print a search instead of starting one")
    search.add_argument("--wait", action="store_true")
    search.add_argument("--json", action="store_true")

    scan = sub.add_parser("sensitivity", help="per-layer sensitivity scans").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    scan_run = scan.add_parser("run", help="compress each layer alone and record what it costs")
    scan_run.add_argument("--model", required=True)
    scan_run.add_argument("--method", required=True)
    scan_run.add_argument("--params", default="{}", help="the setting as JSON, e.g. '{\"amount\": 0.8}'")
    scan_run.add_argument("--task")
    scan_run.add_argument("--wait", action="store_true")
    scan_run.add_argument("--json", action="store_true")
    scan_show = scan.add_parser("show", help="the latest scan of a model with a method")
    scan_show.add_argument("--model", required=True)
    scan_show.add_argument("--method", required=True)
    scan_show.add_argument("--json", action="store_true")

    jobs = sub.add_parser("jobs").add_subparsers(dest="action", required=True, parser_class=_Parser)
    jobs_list = jobs.add_parser("list")
    jobs_list.add_argument("--status")
    jobs_list.add_argument("--limit", type=int, default=100)
    jobs_list.add_argument("--offset", type=int, default=0)
    jobs_list.add_argument("--json", action="store_true")
    for action in ("show", "cancel"):
        one = jobs.add_parser(action)
        one.add_argument("id")
        one.add_argument("--json", action="store_true")

    runs = sub.add_parser("runs").add_subparsers(dest="action", required=True, parser_class=_Parser)
    runs_list = runs.add_parser("list")
    runs_list.add_argument("--model")
    runs_list.add_argument("--limit", type=int, default=100)
    runs_list.add_argument("--offset", type=int, default=0)
    runs_list.add_argument("--json", action="store_true")
    runs_show = runs.add_parser("show")
    runs_show.add_argument("id")
    runs_show.add_argument("--json", action="store_true")

    data = sub.add_parser("data", help="the user's own data").add_subparsers(dest="action", required=True,
                                                                             parser_class=_Parser)
    data_import = data.add_parser("import", help="import a .csv (text,label), .npz (X, y) or .zip of WAV files")
    data_import.add_argument("file")
    data_import.add_argument("--name")
    data_import.add_argument("--json", action="store_true")
    data.add_parser("list").add_argument("--json", action="store_true")
    data_show = data.add_parser("show")
    data_show.add_argument("id")
    data_show.add_argument("--json", action="store_true")

    report = sub.add_parser("report")
    report.add_argument("id")
    report.add_argument("--format", choices=("html", "json", "csv"), default="json")
    return parser


def _print(value, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, default=str))
    elif isinstance(value, list):
        for item in value:
            print(_one_line(item))
    else:
        print(_one_line(value) if isinstance(value, dict) else value)


def _one_line(item: dict) -> str:
    keys = ("id", "job_id", "run_id", "name", "kind", "status", "model_id", "message", "error", "share_path")
    line = "  ".join(f"{k}={item[k]}" for k in keys if item.get(k) not in (None, ""))
    if item.get("metrics") and item.get("baseline"):  # a run: say what it did
        from services import api

        line += "  " + api.summary_sentence(item["metrics"], item["baseline"])
    return line


def _search_lines(found: dict) -> str:
    spec = found["spec"]
    ranges = (", ".join(f"{r['rate']} in [{r['low']:g}, {r['high']:g}]" for r in spec["rates"])
              if spec.get("rates") is not None and spec["rates"] else
              f"{spec['rate']} in [{spec['low']:g}, {spec['high']:g}]" if spec.get("rate") else "the product's choice of methods")
    goal = {"max-drop": f"allowed drop {spec.get('max_drop')} points", "front": "goal: the Pareto front",
            "size": f"goal: the best score under {spec.get('max_mb')} MB",
            "speed": f"goal: the best score at {spec.get('min_speedup')}x faster"}[spec.get("goal", "max-drop")]
    lines = [f"search {found['id']}  status={found['status']}  {ranges}, {goal}, budget {spec['budget']}  "
             f"share_path={found['share_path']}"]
    for trial in found["trials"]:
        measured = f"drop {trial['drop']:+.2f} points, {trial['size_ratio']:.2f}x smaller" if "drop" in trial else ""
        settings = ", ".join(f"{n.split('.')[-1]} {v:g}" for n, v in trial["params"].items()) or \
            f"{spec['param']} {trial['rate']:g}"
        if trial.get("candidate"):
            settings = f"{trial['candidate']}{': ' + settings if trial['params'] else ''}"
        lines.append(f"  {settings}: {trial['status']} {measured}  run={trial['run_id']}")
    if found["outcome"]:
        lines.append(found["outcome"]["sentence"])
    return "\n".join(lines)


def _report(run: dict, fmt: str) -> str:
    from services import api

    if fmt == "json":
        return json.dumps(run, indent=2)
    rows = [("metric", "run", "baseline")]
    if run["metrics"]:
        for key in ("size_bytes", "zipped_bytes", "params", "nonzero_params", "throughput_per_s", "score", "fidelity"):
            rows.append((key, run["metrics"].get(key), run["baseline"].get(key)))
        for key in ("latency_ms", "batch_latency_ms"):
            for pct in ("p50", "p95"):
                rows.append((f"{key}.{pct}", run["metrics"][key][pct], run["baseline"][key][pct]))
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        return out.getvalue()
    summary = api.summary_sentence(run["metrics"], run["baseline"]) if run["metrics"] else run["status"]
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(str(c))}</td>' for c in row)}</tr>" for row in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Run {html.escape(run['id'])}</title></head>"
            f"<body><h1>Run {html.escape(run['id'])} of {html.escape(run['model_id'])}</h1>"
            f"<p>{html.escape(summary)}</p><table>{body}</table>"
            f"<pre>{html.escape(json.dumps(run['recipe'], indent=2))}</pre></body></html>")


def _import_model(db, args, as_json: bool) -> int:
    """Check and store the upload, then wait for its import job: exit 2 with the job's reason when the
    model itself is at fault (the ONNX checker refused it, a dimension was left dynamic, ...)."""
    from services import api

    queued = api.import_model(db, args.source, name=args.name, task=args.task, input_shapes=args.input_shape,
                              dataset_id=args.dataset)
    job = api.wait_for_job(db, queued["job_id"])
    if job["status"] != "succeeded":
        return _job_failed(job)
    _print(api.get_model(db, queued["model_id"]), as_json)
    return 0


def _job_failed(job: dict) -> int:
    """One line on stderr; exit 1 for a fault of ours (the engine raised, the process died),
    2 for what the user can fix or chose (a model the checker refused, a cancelled job)."""
    reason = " ".join(str(job.get("error") or job["message"]).split())
    print(f"error: job {job['id']} {job['status']}: {reason}", file=sys.stderr)
    internal = reason.startswith(("The job failed inside the engine", "The job's process"))
    return 1 if internal else 2


def _sensitivity(db, args, as_json: bool) -> int:
    from services import api

    if args.action == "run":
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as error:
            raise UserError(f"--params is not valid JSON: {error.msg}.", field="params") from None
        if not isinstance(params, dict):
            raise UserError("--params must be a JSON object such as '{\"amount\": 0.8}'.", field="params")
        submitted = api.submit_sensitivity(db, args.model, args.method, params, args.task)
        if not args.wait:
            _print(submitted, as_json)
            return 0
        job = api.wait_for_job(db, submitted["job_id"])
        if job["status"] != "succeeded":
            return _job_failed(job)
    scan = api.latest_scan(db, args.model, args.method)
    if scan is None:
        raise UserError(f"No sensitivity scan of {args.method} on {args.model} yet; run "
                        f"`python -m services sensitivity run --model {args.model} --method {args.method}`.")
    if as_json:
        _print(scan, True)
    else:
        print(f"{scan['method']} on {scan['model_id']} ({scan['summary']['data']}), most sensitive first:")
        for row in scan["layers"]:
            print(f"  {row['layer']:<40} fidelity {row['fidelity']:.4f}  output error {row['output_error']:.4f}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        from services.worker import main as worker_main

        return worker_main(once=args.once)
    if args.command == "hash-password":
        import getpass

        from services.access import hash_password

        password = getpass.getpass("Team password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(hash_password(password))
        return 0

    from services import api

    db = api.connect()
    as_json = getattr(args, "json", False)
    if args.command == "models" and args.action == "list":
        _print(api.list_models(db), as_json)
    elif args.command == "models" and args.action == "import":
        return _import_model(db, args, as_json)
    elif args.command == "models" and args.action == "prepare":
        job_id = api.prepare_model(db, args.id)
        if job_id and args.wait:
            api.wait_for_job(db, job_id)
        _print(api.get_model(db, args.id), as_json)
    elif args.command == "methods":
        _print(api.list_methods(), as_json)
    elif args.command == "compress":
        submitted = api.submit_compress(db, args.model, args.recipe)
        if args.wait:
            job = api.wait_for_job(db, submitted["job_id"])
            if job["status"] != "succeeded":
                return _job_failed(job)
            _print(api.get_run(db, submitted["run_id"]), as_json)
        else:
            _print(submitted, as_json)
    elif args.command == "search":
        if args.show:
            _print(api.get_search(db, args.show), as_json)
            return 0
        if args.max_drop is None and args.goal == "max-drop":
            raise UserError("search needs --max-drop (the score points you can afford to lose); add --rate (such as "
                            "prune.structured.amount) to push one setting, or leave it out to let the search choose.")
        if not args.rate and args.goal == "front":
            raise UserError("A front goal needs the settings to move: add --rate (repeat it for several).")
        started = api.start_search(db, args.model, args.recipe, args.rate, args.max_drop, args.budget, args.task,
                                   goal=args.goal, minutes=args.minutes, max_mb=args.max_mb,
                                   min_speedup=args.min_speedup)
        found = api.wait_for_search(db, started["id"]) if args.wait else started
        _print(found if as_json else _search_lines(found), as_json)
        if args.wait and found["status"] != "succeeded":
            return 2
    elif args.command == "sensitivity":
        return _sensitivity(db, args, as_json)
    elif args.command == "jobs" and args.action == "list":
        _print(api.list_jobs(db, args.status, args.limit, args.offset), as_json)
    elif args.command == "jobs" and args.action == "show":
        _print(api.get_job(db, args.id), as_json)
    elif args.command == "jobs" and args.action == "cancel":
        _print(api.cancel_job(db, args.id), as_json)
    elif args.command == "runs" and args.action == "list":
        _print(api.list_runs(db, args.model, args.limit, args.offset), as_json)
    elif args.command == "runs" and args.action == "show":
        _print(api.get_run(db, args.id), as_json)
    elif args.command == "data" and args.action == "import":
        _print(api.import_dataset_file(db, args.file, args.name), as_json)
    elif args.command == "data" and args.action == "list":
        _print(api.list_datasets(db), as_json)
    elif args.command == "data" and args.action == "show":
        _print(api.get_dataset(db, args.id), as_json)
    elif args.command == "report":
        print(_report(api.get_run(db, args.id), args.format))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
