"""Argument parsing only: each command builds its spec and calls one library function.

Exit codes: 0 done; 1 the job ran but something failed (a shard, a replica); 2 a bad
invocation, reported on one line of stderr with nothing written.

`run`, `worker` and `serve` start the replicas' fork server as soon as their arguments parse
(it imports torch meanwhile: replica_server.py), so this module imports little before that.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from batchjob.errors import BatchJobError, UsageError
from batchjob.replica_server import start_replica_server, stop_replica_server
from batchjob.startup import mark

DRIVERS = ("run", "worker", "serve")  # the commands that start replicas


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and logs read it whole.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _buckets(text: str) -> tuple[int, ...]:
    from batchjob.config import parse_buckets

    try:
        return parse_buckets(text)
    except UsageError as e:  # argparse reports ArgumentTypeError on its one line
        raise argparse.ArgumentTypeError(str(e)) from None


def _log_level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"must be DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return text.upper()


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument(
        "--model",
        default=S,
        help="artifact or model: a directory, a hub id, s3://.../x.tar.gz or s3://prefix/",
    )
    p.add_argument(
        "--task",
        default=S,
        help="text-classification, token-classification, feature-extraction; run, worker, "
        "serve: also zero-shot-classification, text-ranking (a classifier's graphs)",
    )
    p.add_argument("--backend", default=S, help="cpu (default), neuron (Inf1), neuronx (Inf2/Trn1)")
    p.add_argument("--dtype", default=S, help="auto (default: bf16 where native), fp32, bf16")
    p.add_argument("--batch-size", type=_integer, default=S, help="rows per batch (6)")
    p.add_argument("--sequence-length", type=_integer, default=S, help="tokens per row (128)")
    p.add_argument("--buckets", type=_buckets, default=S, help="lengths, e.g. 16,32,64,128")
    p.add_argument(
        "--max-batch-tokens", type=_integer, default=S, help="batch size = this // bucket"
    )
    p.add_argument("--compiler-args", default=S, help="passed to the Neuron compiler, quoted")
    p.add_argument(
        "--pooling",
        default=S,
        help="feature-extraction: auto (the model's own), cls, max, mean, mean_sqrt_len_tokens, "
        "weightedmean, lasttoken",
    )
    p.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        default=S,
        help="feature-extraction: don't L2-normalise embeddings",
    )
    p.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="several documents per row (default where the model family allows it)",
    )
    p.add_argument("--max-segments", type=_integer, default=S, help="packing: documents per row")
    p.add_argument(
        "--calibrate", default=S, help="packing: a sample of the input to choose the shape from"
    )


def _add_replica_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--replicas", type=_integer, default=S, help="default: one per core")
    p.add_argument("--cores-per-replica", type=_integer, default=S, help="default 1")
    p.add_argument("--replica-start-timeout", type=float, default=S, help="seconds (300)")
    p.add_argument("--cache-dir", default=S, help="where compiled plain models are kept")


def _add_record_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--text-field", default=S, help="field holding the text (text)")
    p.add_argument("--text-pair-field", default=S, help="field holding the second text of a pair")
    p.add_argument("--id-field", default=S, help="field holding the record id (id)")


def _add_text_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument(
        "--long-documents",
        default=S,
        help="truncate (default), chunk (a row per window), mean (of the windows)",
    )
    p.add_argument("--chunk-overlap", type=_integer, default=S, help="tokens windows share (32)")
    p.add_argument("--prompt", default=S, help="text put before every text, e.g. 'query: '")
    p.add_argument("--prompt-name", default=S, help="the model's prompt of that name")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--keep-columns", default=S, help="input columns copied to the output: a,b")
    p.add_argument("--embedding-type", default=S, help="fixed (fixed_size_list, default) or list")
    p.add_argument(
        "--embedding-dim", type=_integer, default=S, help="keep the first N dims, renormalised"
    )
    p.add_argument(
        "--embedding-precision", default=S, help="float32 (default), float16, int8, binary"
    )
    p.add_argument("--embedding-ranges", default=S, help="int8: JSON [[min...],[max...]] file")
    p.add_argument(
        "--multi-label",
        action="store_true",
        default=S,
        help="text-classification: sigmoid scores and `labels` (default: as the model's config)",
    )
    p.add_argument(
        "--threshold", type=float, default=S, help="multi-label: a label's score to be in labels"
    )
    p.add_argument("--candidate-labels", default=S, help="zero-shot: labels, a,b,c")
    p.add_argument(
        "--candidate-labels-field", default=S, help="zero-shot: each record's labels (a list)"
    )
    p.add_argument(
        "--hypothesis-template", default=S, help='zero-shot: "This example is {}." (default)'
    )
    p.add_argument("--group-field", default=S, help="text-ranking: add `rank` within each group")
    p.add_argument(
        "--aggregation",
        default=S,
        help="token-classification: none, simple (default), first, average, max",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchjob", description="Batch inference for Hugging Face encoders.")
    parser.add_argument("--log-level", default="INFO", type=_log_level, help="DEBUG, INFO...")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    S = argparse.SUPPRESS

    p = commands.add_parser("compile", help="compile a model to fixed-shape graphs")
    _add_model_options(p)
    p.add_argument("--output", required=True, help="artifact directory to create")
    p.add_argument("--cache-dir", default=S, help="where an s3:// --model is downloaded to")

    p = commands.add_parser("run", help="run a model over shards (local or S3), write Parquet")
    p.add_argument("--job", default=S, help="YAML job file with the same fields; flags override")
    _add_model_options(p)
    _add_replica_options(p)
    p.add_argument("--input", default=S, help="a shard or a directory of shards, or s3://b/p/")
    p.add_argument("--input-manifest", default=S, help="instead of --input: a list of shards")
    p.add_argument("--max-shards-in-flight", type=_integer, default=S, help="open at once (8)")
    p.add_argument("--output", default=S, help="directory or s3:// prefix for the outputs")
    p.add_argument("--format", default=S, help="auto (by extension), jsonl, csv, parquet, txt")
    _add_record_options(p)
    p.add_argument("--resume", action="store_true", default=S, help="skip shards already done")
    p.add_argument("--partition", default=S, help="I/N: run part I (0-based) of N of the shards")
    p.add_argument(
        "--partitions",
        type=_integer,
        default=S,
        help="N parts, this one's index from JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX",
    )
    p.add_argument("--sort-window", type=_integer, default=S, help="records (4096)")
    p.add_argument(
        "--records-per-read", type=_integer, default=S, help="records read at a time (1024)"
    )
    p.add_argument("--chunk-size", type=_integer, default=S, help="deprecated: --records-per-read")
    _add_text_options(p)
    p.add_argument("--progress", default=S, help="auto, bar, log, none")
    _add_output_options(p)
    _add_bucket_owner_option(p)
    _add_price_options(p)

    p = commands.add_parser("serve", help="the SageMaker Batch Transform container (HTTP)")
    _add_model_options(p)  # --model defaults to /opt/ml/model; see serve_config.py for env
    _add_replica_options(p)
    p.add_argument("--host", default=S, help="address to listen on (0.0.0.0)")
    p.add_argument("--port", type=_integer, default=S, help="SAGEMAKER_BIND_TO_PORT or 8080")
    p.add_argument("--max-batch-delay-ms", type=float, default=S, help="partial batch wait (5)")
    p.add_argument("--text-field", default=S, help="jsonlines/csv field with the text (inputs)")
    _add_text_options(p)
    _add_output_options(p)
    p.add_argument("--drain-seconds", type=float, default=S, help="on SIGTERM (25)")
    p.add_argument(
        "--max-concurrent-requests",
        type=_integer,
        default=S,
        help="requests read and worked on at once; more wait (MaxConcurrentTransforms)",
    )
    p.add_argument(
        "--queue-timeout", type=float, default=S, help="seconds waiting for a slot, then 503 (300)"
    )
    p.add_argument(
        "--header-timeout", type=float, default=S, help="seconds to send a request head (60)"
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=S,
        help="seconds before a body or answer must move at 64 KiB/s (30)",
    )

    p = commands.add_parser("worker", help="consume an SQS queue, write Parquet to S3")
    p.add_argument("--job", default=S, help="YAML file with the same fields; flags override")
    _add_model_options(p)
    _add_replica_options(p)
    p.add_argument("--queue", default=S, help="SQS queue URL (or name)")
    p.add_argument("--output", default=S, help="s3:// prefix for results (job messages may differ)")
    p.add_argument("--exit-when-idle", type=float, default=S, help="seconds with no message: exit")
    p.add_argument("--drain-seconds", type=float, default=S, help="on SIGTERM (25)")
    p.add_argument("--metrics-port", type=_integer, default=S, help="Prometheus /metrics port")
    p.add_argument("--metrics-host", default=S, help="address for --metrics-port (0.0.0.0)")
    p.add_argument("--max-batch-delay-ms", type=float, default=S, help="partial batch wait (5)")
    p.add_argument("--max-messages-in-flight", type=_integer, default=S, help="at once (16)")
    p.add_argument(
        "--allow-input",
        action="append",
        default=S,
        help="s3://bucket/prefix/ that messages may read (repeatable; required)",
    )
    p.add_argument(
        "--allow-any-input",
        action="store_true",
        default=S,
        help="let messages read any object the worker's role can (instead of --allow-input)",
    )
    _add_bucket_owner_option(p)
    _add_record_options(p)
    _add_text_options(p)
    _add_output_options(p)

    p = commands.add_parser("submit", help="send a job's shards to an SQS queue for workers")
    p.add_argument("--input", default=S, help="s3://bucket/prefix/ (or one object)")
    p.add_argument("--input-manifest", default=S, help="instead of --input: a list of shards")
    p.add_argument("--queue", default=S, help="SQS queue URL (or name) the workers consume")
    p.add_argument("--output", default=S, help="s3:// prefix for the outputs (and records)")
    p.add_argument("--shards-per-message", type=_integer, default=S, help="1..100 (1)")
    p.add_argument("--job-id", default=S, help="default: derived from the input and output")
    _add_bucket_owner_option(p)

    p = commands.add_parser("status", help="a job's progress: exit 0 done, 3 not yet, 1 failed")
    p.add_argument("--output", default=S, help="the job's output (s3:// prefix or directory)")
    p.add_argument("--job-id", default=S, help="one job (default: every job and run there)")
    _add_price_options(p)
    _add_bucket_owner_option(p)
    return parser


def _add_price_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument(
        "--price-per-hour", type=float, default=S, help="USD per machine-hour: cost figures"
    )
    p.add_argument(
        "--instance-type", default=S, help="instead: its On-Demand price (e.g. inf2.xlarge)"
    )


def _add_bucket_owner_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expected-bucket-owner",
        default=argparse.SUPPRESS,
        help="AWS account id every S3 bucket used must belong to (ExpectedBucketOwner)",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        return _start(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (imports, checks)
        print("batchjob: interrupted", file=sys.stderr)
        return 130


def _start(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command not in DRIVERS:
        return _main(args)
    try:
        start_replica_server()
        mark("replica fork server started")
    except OSError:  # (no writable temp dir for its socket) the pool will say so, on one line
        logging.getLogger("batchjob").debug("fork server not started early", exc_info=True)
    try:
        return _main(args)
    finally:
        stop_replica_server()  # it may still be importing torch after a refusal


def _main(args: argparse.Namespace) -> int:
    from batchjob.config import compile_spec, run_spec, worker_spec
    from batchjob.job_files import load_job_file

    fields = vars(args)
    try:
        if args.command == "compile":
            from batchjob.compile import compile_artifact
            from batchjob.config import default_cache_dir
            from batchjob.model_location import local_compile_spec

            cache_dir = fields.get("cache_dir") or default_cache_dir()
            compile_artifact(local_compile_spec(compile_spec(fields), cache_dir), args.output)
            print(f"batchjob compile: artifact written to {args.output}")
            return 0
        if "job" in fields:
            fields = {**load_job_file(fields["job"], args.command), **fields}
        if args.command == "run":
            from batchjob.runner import run

            mark("imports done")
            import os

            return run(run_spec(fields, os.environ))
        if args.command == "worker":
            from batchjob.worker import work

            mark("imports done")
            return work(worker_spec(fields))
        if args.command == "submit":
            from batchjob.job_specs import submit_spec
            from batchjob.submit import submit

            return submit(submit_spec(fields))
        if args.command == "status":
            from batchjob.job_specs import status_spec
            from batchjob.status import status

            return status(status_spec(fields))
        if args.command == "serve":
            import os

            from batchjob.serve_config import serve_spec
            from batchjob.serving import serve

            mark("imports done")
            return serve(serve_spec(fields, os.environ))
    except UsageError as e:
        print(f"batchjob {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BatchJobError as e:
        print(f"batchjob {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment's fault (a full disk, a lost mount): no traceback
        logging.getLogger("batchjob").debug("failed", exc_info=True)
        print(f"batchjob {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
