"""The shared harness of the benchmarks in bench/: each module holds one concept.

* progress: progress lines on stderr (stdout carries the JSON report)
* cli: argparse types shared by the benchmarks' command lines
* stats: percentiles, medians, ratios and a least-squares fit
* machine: what the numbers were measured on (CPU, versions, load average)
* pinning: which CPUs the servers and the load generators run on
* procstats: process trees, CPU seconds and resident memory from /proc
* database: a fresh PostgreSQL database per run (DATABASE_URL's server, else an embedded one)
* auth: the JWT secret prefd is started with, tokens minted from it, and call metadata
* children: server child processes (prefd, the echo, idle-watch and fan-out floor baselines)
* seed: rows written straight into a run's database
* prometheus: a free port for prefd's metrics endpoint and reading its counters
* streams: streaming calls a benchmark holds open, and their readers
* h2load: running h2load against a gRPC method and parsing its summary
* echo_comparison: a unary read measured against bench/echo_server.py (effective_read, ai_effective_read)
* entry: run_main, which runs a benchmark, handles SIGTERM and prints its JSON report

Benchmarks import these modules by package name: run them as ``.venv/bin/python bench/<name>.py``
from the repository root.
"""
