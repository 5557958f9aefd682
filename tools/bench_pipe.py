"""A reader of bench.py's ``interleaved_rates`` that runs in another process: a pass is one
``pass`` line to it, answered with the number of samples the pass yielded.

The other process (``bench_peers_child.py serve``, ``bench_base_child.py``) starts once, opens
its dataset, prints ``ready ...`` and then answers each ``pass``, while this process waits; its
clock runs here and so includes one pipe round trip (about 20 us here).
"""

from __future__ import annotations

import select
import subprocess

START_SECONDS = 300.0  # the reader's imports and first listing
PASS_SECONDS = 600.0  # one pass over a shard set


class PassServer:
    """The process running ``command`` (with ``env``), which ``what`` names in errors; with
    ``prepares``, ``prepare`` (untimed, before each pass) is a ``prepare`` line answered ``ok``."""

    def __init__(self, command: list[str], env: dict, what: str, prepares: bool = False):
        self.what = what
        self.prepares = prepares
        self.pass_seconds: float | None = None
        self.named: dict[str, float] = {}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._line(START_SECONDS)
        if not self.ready.startswith("ready"):
            self.close()
            raise SystemExit(f"{what}: `{' '.join(command)}` did not start (said {self.ready!r}, "
                             f"exit status {self.process.returncode})")

    def prepare(self) -> None:
        if self.prepares and self._ask("prepare").strip() != "ok":
            raise SystemExit(f"{self.what}: the reader exited before a pass (status {self.process.wait()}); "
                             "its error is above")

    def one_pass(self) -> int:
        """The pass's sample count; a second number on the answer's line, the seconds the
        reader measured the pass to take itself, is kept in ``pass_seconds``, and ``name=value``
        numbers after it in ``named`` (bench_link.py's ``first=``)."""
        answer = self._ask("pass").split()
        if not answer:
            raise SystemExit(f"{self.what}: the reader exited mid-run (status {self.process.wait()}); "
                             "its error is above")
        plain = [a for a in answer[1:] if "=" not in a]
        self.named = {k: float(v) for k, v in (a.split("=", 1) for a in answer[1:] if "=" in a)}
        self.pass_seconds = float(plain[0]) if plain else None
        return int(answer[0])

    def _ask(self, what: str) -> str:
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return self._line(PASS_SECONDS)

    def _line(self, seconds: float) -> str:
        """The reader's next line; a reader silent for ``seconds`` is killed (a hang fails the run)."""
        if not select.select([self.process.stdout], [], [], seconds)[0]:
            self.process.kill()
            raise SystemExit(f"{self.what}: the reader said nothing for {seconds:.0f} s; killed")
        return self.process.stdout.readline()

    def close(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen, seconds: float = 60.0) -> None:
    """Ends a child that runs until its stdin closes; killed if it has not exited ``seconds`` later."""
    process.stdin.close()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
