"""Fuzz every kind of user input at scale, each case in its own process.

Each worker builds the cases of ``tests/fuzzing.py`` and forks a child per ``--batch``
cases. The child gets an address-space cap (``RLIMIT_AS``: what it had at the fork plus
``--memory-cap``), runs the cases one by one, each under a ``--timeout`` alarm, and
reports each with its peak resident memory; the worker kills a child that stops
reporting, and the rest of its cases go to a fresh child. A case ends as:

- ok / clean: accepted, or refused with a TokenScopeError (a message for the user);
- crash: any other exception, a wrong result, or a child that died (a signal);
- over cap: it tried to allocate past the cap (MemoryError, "can't allocate memory");
- hang: still running at the timeout.

Usage (the table goes to stdout, every case to ``--out`` as JSON lines)::

    python benchmarks/fuzz.py --cases 3000 --memory-cap 2G --timeout 20 --jobs 2
    python benchmarks/fuzz.py --cases 200 --kinds image,schedule_text --calibrate

``--calibrate`` first runs two control cases that must be caught: one that sleeps past
the timeout and one that allocates past the cap.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked children must not inherit a pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")
STATUSES = ("ok", "clean", "crash", "over cap", "hang")
MEMORY_WORDS = ("MemoryError", "can't allocate memory", "DefaultCPUAllocator", "bad_alloc")


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _statm() -> tuple[int, int]:
    """(virtual size, resident size) of this process in bytes."""
    with open("/proc/self/statm") as handle:
        size, resident = handle.read().split()[:2]
    return int(size) * PAGE, int(resident) * PAGE


class CaseTimeout(BaseException):
    """Raised in a child by its per-case alarm."""


def _on_alarm(signum: int, frame: object) -> None:
    raise CaseTimeout


def run_batch(tasks: list[tuple[object, object]], timeout: float, cap: int) -> list[dict]:
    """Run ``(name, task)`` pairs in forked children, many per child (a fork of a process
    holding torch costs about 80 ms). Each task gets ``timeout`` seconds (an alarm in the
    child, and the parent's own clock for code that never returns to Python) and the
    address-space ``cap`` on top of what the child had at the fork. After a hang, a death
    or a case over the cap, the rest run in a fresh child. Returns one report per task:
    status, detail, seconds, peak_mb (the child's peak so far) and growth_mb (that peak
    less the child's size at birth: an upper bound of what the case allocated)."""
    reports: list[dict] = []
    while len(reports) < len(tasks):
        reports.extend(_one_child(tasks[len(reports) :], timeout, cap))
    return reports


def _one_child(tasks: list[tuple[object, object]], timeout: float, cap: int) -> list[dict]:
    read_end, write_end = os.pipe()
    virtual, _ = _statm()
    pid = os.fork()
    if pid == 0:  # the child: one JSON line per finished case
        os.close(read_end)
        born = _statm()[1]
        signal.signal(signal.SIGALRM, _on_alarm)
        resource.setrlimit(resource.RLIMIT_AS, (virtual + cap, resource.RLIM_INFINITY))
        for _, task in tasks:
            began = time.monotonic()
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    report = task()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except CaseTimeout:
                report = {"status": "hang", "detail": f"still running after {timeout:g} s"}
            except BaseException as error:
                report = {"status": "crash", "detail": f"{type(error).__name__}: {error}"[:500]}
            try:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                report["seconds"] = round(time.monotonic() - began, 3)
                report["peak_mb"] = round(peak / 2**20, 1)
                report["growth_mb"] = round(max(0, peak - born) / 2**20, 1)
                line = json.dumps(report) + "\n"
            except BaseException:
                line = '{"status": "crash", "detail": "MemoryError while reporting"}\n'
            os.write(write_end, line.encode()[:60000])
            if report.get("status") in ("hang", "over cap") or _memory(report):
                break  # start the rest in a clean process
        os._exit(0)
    os.close(write_end)
    reports: list[dict] = []
    buffer = b""
    deadline = time.monotonic() + timeout + 5
    killed = False
    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            reports.append(json.loads(line))
            deadline = time.monotonic() + timeout + 5
    _, status, usage = os.wait4(pid, 0)
    os.close(read_end)
    stopped = bool(reports) and (
        reports[-1]["status"] in ("hang", "over cap") or _memory(reports[-1])
    )
    if len(reports) < len(tasks) and not stopped:
        # The case in flight never reported: it hung in native code, or the process died.
        if killed:
            detail = f"still running after {timeout:g} s (native code)"
            state = "hang"
        else:
            signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            name = signal.Signals(signum).name if signum else f"exit {os.WEXITSTATUS(status)}"
            detail, state = f"the process died ({name})", "crash"
        peak = round(usage.ru_maxrss / 1024, 1)
        reports.append(
            {"status": state, "detail": detail, "seconds": None, "peak_mb": peak,
             "growth_mb": None}
        )  # fmt: skip
    for report in reports:
        if report["status"] == "crash" and _memory(report):
            report["status"] = "over cap"
    return reports


def _memory(report: dict) -> bool:
    return any(word in report.get("detail", "") for word in MEMORY_WORDS)


def worker(args: argparse.Namespace) -> int:
    """Run this worker's share of the cases; one JSON line per case on stdout."""
    import torch

    from tests.fuzzing import Harness

    torch.set_num_threads(1)
    harness = Harness(seed=args.seed)
    cap = parse_size(args.memory_cap)
    if args.calibrate and args.worker_index == 0:
        controls = [("hang", _sleeper(args.timeout)), ("over cap", _hog(cap))]
        for (name, _), report in zip(controls, run_batch(controls, args.timeout, cap), strict=True):
            print(json.dumps({"kind": "control", "index": name, **report}), flush=True)
    for kind in args.kinds.split(","):
        indices = list(range(args.worker_index, args.cases, args.jobs))
        for at in range(0, len(indices), args.batch):
            chunk = indices[at : at + args.batch]
            tasks = [(index, _judge(harness, kind, index)) for index in chunk]
            for index, report in zip(chunk, run_batch(tasks, args.timeout, cap), strict=True):
                print(json.dumps({"kind": kind, "index": index, **report}), flush=True)
    return 0


def _judge(harness, kind: str, index: int):
    def task() -> dict:
        outcome = harness.judge(kind, index)
        return {"status": outcome.status, "detail": outcome.detail}

    return task


def _sleeper(timeout: float):
    def task() -> dict:
        time.sleep(timeout + 5)
        return {"status": "ok"}

    return task


def _hog(cap: int):
    def task() -> dict:
        import torch

        torch.ones(cap // 4 + 2**20)  # float32: a little past the cap
        return {"status": "ok"}

    return task


def summarise(rows: list[dict]) -> str:
    """The Markdown table of docs/reliability.md."""
    lines = [
        "| input | cases | accepted | clean errors | crashes | hangs | over cap | "
        "peak RSS (MB) | peak growth (MB) | slowest (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    for kind, found in by_kind.items():
        counts = Counter(row["status"] for row in found)
        lines.append(
            f"| {kind} | {len(found)} | {counts['ok']} | {counts['clean']} | {counts['crash']} | "
            f"{counts['hang']} | {counts['over cap']} | "
            f"{max(r['peak_mb'] for r in found):.0f} | "
            f"{max(r['growth_mb'] or 0 for r in found):.0f} | "
            f"{max(r['seconds'] for r in found):.1f} |"
        )
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """Distinct crash, hang and over-cap signatures, with the first case of each."""
    seen: dict[tuple[str, str], list] = {}
    for row in rows:
        if row["kind"] == "control" or row["status"] not in ("crash", "hang", "over cap"):
            continue
        key = (row["kind"], row["status"] + ": " + row.get("detail", "")[:120])
        seen.setdefault(key, []).append(row["index"])
    return [f"{kind} case {cases[0]} (x{len(cases)}): {sig}" for (kind, sig), cases in seen.items()]


def main(argv: list[str] | None = None) -> int:
    from tests.fuzzing import KINDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds")
    parser.add_argument("--memory-cap", default="2G", help="address space a case may add")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--batch", type=int, default=50, help="cases per forked child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="every case as JSON lines")
    parser.add_argument("--calibrate", action="store_true", help="run the two control cases")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_index is not None:
        return worker(args)
    started = time.monotonic()
    command = [
        sys.executable, str(Path(__file__).resolve()), "--cases", str(args.cases), "--kinds",
        args.kinds, "--memory-cap", args.memory_cap, "--timeout", str(args.timeout), "--jobs",
        str(args.jobs), "--seed", str(args.seed), "--batch", str(args.batch),
        *(["--calibrate"] if args.calibrate else []),
    ]  # fmt: skip
    processes = [
        subprocess.Popen([*command, "--worker-index", str(j)], stdout=subprocess.PIPE, text=True)
        for j in range(args.jobs)
    ]
    rows = []
    for process in processes:
        for line in process.stdout:
            rows.append(json.loads(line))
        process.wait()
    if args.out is not None:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    controls = [row for row in rows if row["kind"] == "control"]
    for row in controls:
        caught = row["status"] == row["index"]
        print(f"control '{row['index']}': {row['status']} ({'caught' if caught else 'MISSED'})")
    print(summarise([row for row in rows if row["kind"] != "control"]))
    for line in findings(rows):
        print("-", line)
    minutes = (time.monotonic() - started) / 60
    print(f"{len(rows) - len(controls)} cases in {minutes:.1f} min, {args.jobs} worker(s)")
    bad = [r for r in rows if r["kind"] != "control" and r["status"] in STATUSES[2:]]
    missed = [row for row in controls if row["status"] != row["index"]]
    return 1 if bad or missed else 0


if __name__ == "__main__":
    sys.exit(main())
