"""Fuzz the gateway's request path with atheris (libFuzzer, coverage-guided):

    nice -n 10 .venv/bin/python -m tests.fuzz.request_path --minutes 10

Each input is a client byte stream, run through a fresh in-memory gateway (tests/gateway/inmemory.py) in every
mode of `invariants.MODES` and checked by `invariants.check`. The fuzzer starts from the corpus in
tests/fuzz/corpus/request_path/ (hostile shapes written by hand, then inputs earlier runs found), mutates with
the HTTP tokens of tests/fuzz/http.dict, and follows coverage of the `gateway` package. When the time is up:

- inputs that reached new coverage are merged into the corpus (only those that add coverage, and none that
  breaks an invariant: those go to WORK/failing/), for the default test run to replay
  (tests/fuzz/test_request_path.py); `--no-merge` skips this, `--merge DIR` does only this;
- the first input that broke each distinct invariant (`Failure.signature`) is in WORK/failures/, shrunk to a
  minimal one (`.min`) beside a description (`.txt`); the summary lists them. A crash of the harness itself is
  libFuzzer's `WORK/crash-*`.

`--replay FILE...` runs inputs and prints what they break; `--minimize FILE` shrinks one input while it still
breaks the same invariants.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# tests.fuzz.invariants (and through it the gateway) is imported inside functions: the fuzzing process must import
# it only once atheris instruments imports.

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus" / "request_path"
DICTIONARY = ROOT / "tests" / "fuzz" / "http.dict"
WORK = Path(tempfile.gettempdir()) / "meshgate-fuzz" / "request_path"
MAX_LEN = 4096  # bytes per input: room for a few pipelined requests with bodies, small enough to run fast
INPUT_TIMEOUT = 30  # seconds one input may take before libFuzzer reports it as a hang
MINIMIZE_SECONDS = 120.0  # per failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"new inputs and failures go here (default {WORK})")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help=f"longest input in bytes (default {MAX_LEN})")
    parser.add_argument("--no-merge", action="store_true", help="do not add new inputs to the corpus afterwards")
    parser.add_argument("--merge", type=Path, metavar="DIR", help="only merge inputs from DIR into the corpus")
    parser.add_argument("--replay", type=Path, nargs="+", metavar="FILE", help="run inputs, print what they break")
    parser.add_argument("--minimize", type=Path, metavar="FILE", help="shrink an input that breaks an invariant")
    parser.add_argument("--libfuzzer", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the fuzzing process
    args = parser.parse_args(argv)
    if args.libfuzzer is not None:
        return run_libfuzzer(args.libfuzzer, args.work)
    if args.replay:
        return replay_files(args.replay)
    if args.minimize:
        return minimize_file(args.minimize)
    if args.merge:
        merge(args.merge, args.work, _options(args.max_len))
        return 0
    return fuzz(args.minutes, args.work, args.max_len, merging=not args.no_merge)


def fuzz(minutes: float, work: Path, max_len: int, merging: bool) -> int:
    new, failures = work / "new", work / "failures"
    new.mkdir(parents=True, exist_ok=True)
    failures.mkdir(parents=True, exist_ok=True)
    seconds = max(1, round(minutes * 60))
    print(f"fuzzing for {seconds}s; new inputs in {new}, failures in {failures}", flush=True)
    status = _libfuzzer(work, [str(new), str(CORPUS), f"-max_total_time={seconds}", *_options(max_len)])
    if merging:
        merge(new, work, _options(max_len))
    found = summarize(failures)
    return 1 if found or status != 0 else 0


def merge(new: Path, work: Path, options: list[str]) -> None:
    """Add to the corpus the inputs in `new` that reach coverage the corpus does not (libFuzzer's -merge=1)."""
    before = set(CORPUS.iterdir())
    _libfuzzer(work, ["-merge=1", str(CORPUS), str(new), *options])
    kept = keep_passing(sorted(set(CORPUS.iterdir()) - before), work / "failing")
    print(f"corpus: {len(kept)} inputs with new coverage added to {CORPUS}", flush=True)


def _options(max_len: int) -> list[str]:
    return [f"-max_len={max_len}", f"-timeout={INPUT_TIMEOUT}", f"-dict={DICTIONARY}", "-rss_limit_mb=4096"]


def _command(work: Path) -> list[str]:
    return [sys.executable, "-m", "tests.fuzz.request_path", "--work", str(work), "--libfuzzer"]


def _libfuzzer(work: Path, arguments: list[str]) -> int:
    command = [*_command(work), f"-artifact_prefix={work}/", *arguments]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def run_libfuzzer(arguments: list[str], work: Path) -> int:
    """The fuzzing process: libFuzzer calls `one_input` for each input it makes, until its time is up."""
    import atheris  # type: ignore[import-untyped]  # (no type hints; only this process needs it)

    with atheris.instrument_imports(include=["gateway"]):
        from tests.fuzz.invariants import replay
        from tests.gateway.inmemory import MemoryGateway
    failures = work / "failures"
    failures.mkdir(parents=True, exist_ok=True)
    seen = {path.stem for path in failures.glob("*.txt")}
    gateway = MemoryGateway()

    def one_input(data: bytes) -> None:
        for mode, failure in replay(data, gateway):
            name = _name(failure.signature)
            if name not in seen:  # the first input per distinct fault; the fuzzer goes on looking for others
                seen.add(name)
                (failures / f"{name}.bin").write_bytes(data)
                (failures / f"{name}.txt").write_text(f"{failure.signature}\n[{mode}] {failure}\n")
                print(f"\nNEW FAILURE {name}: [{mode}] {failure}", flush=True)

    # libFuzzer runs its argv[0] again, through the shell, to merge: so argv[0] is the whole command of this process.
    atheris.Setup([shlex.join(_command(work)), *arguments], one_input)
    atheris.Fuzz()
    return 0  # (libFuzzer exits the process itself)


def keep_passing(added: list[Path], failing: Path) -> list[Path]:
    """The corpus is replayed by the default test run, so it keeps only inputs that break nothing; those that do
    are moved to `failing` (each fault has its minimal input in failures/, for a named, xfail'd corpus entry)."""
    from tests.fuzz.invariants import replay

    kept = []
    for path in added:
        if replay(path.read_bytes()):
            failing.mkdir(parents=True, exist_ok=True)
            path.rename(failing / path.name)
        else:
            kept.append(path)
    if len(kept) < len(added):
        print(f"{len(added) - len(kept)} new inputs break an invariant: moved to {failing}, not kept in the corpus")
    return kept


def summarize(failures: Path) -> int:
    """Shrink each new failure to a minimal input and list them all."""
    found = sorted(failures.glob("*.bin"))
    for path in found:
        minimal = path.with_suffix(".min")
        if not minimal.exists():
            signature = path.with_suffix(".txt").read_text().splitlines()[0]
            minimal.write_bytes(minimize(path.read_bytes(), _breaks(signature)))
    print(f"\n{len(found)} distinct invariant failures" + (f" (in {failures}):" if found else ""))
    for path in found:
        description = path.with_suffix(".txt").read_text().splitlines()
        print(f"\n{path.stem}: {description[0]}\n  minimal input: {path.with_suffix('.min').read_bytes()!r}")
        print(f"  first seen: {description[1][:400]}")
    return len(found)


def replay_files(paths: list[Path]) -> int:
    from tests.fuzz.invariants import replay

    broken = 0
    for path in paths:
        failures = replay(path.read_bytes())
        broken += bool(failures)
        print(f"{path}: " + ("ok" if not failures else f"{len(failures)} failures"))
        for mode, failure in failures:
            print(f"  [{mode}] {failure}")
    return 1 if broken else 0


def minimize_file(path: Path) -> int:
    from tests.fuzz.invariants import replay

    signatures = {failure.signature for _, failure in replay(path.read_bytes())}
    if not signatures:
        print(f"{path} breaks no invariant")
        return 1
    minimal = minimize(path.read_bytes(), lambda data: signatures <= _signatures(data))
    print(repr(minimal))
    return 0


def minimize(data: bytes, still_fails: Callable[[bytes], bool], seconds: float = MINIMIZE_SECONDS) -> bytes:
    """Delta debugging (ddmin, complements only): drop ever smaller slices while the input still fails."""
    deadline = time.monotonic() + seconds
    parts = 2
    while len(data) > 1 and time.monotonic() < deadline:
        size = -(-len(data) // parts)
        for start in range(0, len(data), size):
            candidate = data[:start] + data[start + size :]
            if candidate and still_fails(candidate):
                data, parts = candidate, max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(data), parts * 2)
    return data


def _breaks(signature: str) -> Callable[[bytes], bool]:
    return lambda data: signature in _signatures(data)


def _signatures(data: bytes) -> set[str]:
    from tests.fuzz.invariants import replay

    return {failure.signature for _, failure in replay(data)}


def _name(signature: str) -> str:
    return hashlib.sha1(signature.encode()).hexdigest()[:12]


if __name__ == "__main__":
    sys.exit(main())
