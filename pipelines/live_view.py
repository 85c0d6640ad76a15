"""A concise live view of a kfp.local run, with every task's full log kept in a file.

Why: kfp.local prints each task's executor input (every parameter as JSON),
its warnings about non-Python images and everything the task logs --
hundreds of lines for the demo, with a failure's cause buried far above the
end.  :class:`LiveView` stands in for ``sys.stdout``/``sys.stderr`` while the
pipeline runs: it writes everything kfp.local prints to ``logs/run.log`` and
each task's part to ``logs/<task>.log``, and shows the user one line per
task (tasks done / total, what the task works on, elapsed and estimated
remaining time) -- on a terminal also a status line for the running task.
When a task fails, :meth:`failure` names it, its own error line and its log.

kfp.local runs one task at a time and announces each with ``Executing task
'<name>'`` and ``Task '<name>' finished with status <STATUS>`` (kfp 2.17,
``kfp/local/task_dispatcher.py``); those lines drive the view.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Exit|Failed|Refused|NotFound|Checkpoint)\b.*")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunFailed(RuntimeError):
    """A task of a local run failed; the message is the task, its own error and the path of its log."""


class LiveView(io.TextIOBase):
    """File-like sink for kfp.local's output that keeps logs in files and shows progress on ``out``."""

    def __init__(self, display_names: dict[str, str], log_dir: Path, out: TextIO | None = None,
                 tty: bool | None = None) -> None:
        super().__init__()
        self.names = dict(display_names)
        self.total = len(display_names)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.out = out or sys.__stdout__
        self.tty = self.out.isatty() if tty is None else tty
        self.run_log = open(self.log_dir / "run.log", "w", encoding="utf-8")
        self.task_log: TextIO | None = None
        self.current: str | None = None
        self.task_started = 0.0
        self.started = time.monotonic()
        self.done: list[tuple[str, float]] = []
        self.failed: tuple[str, str] | None = None  # (task, status)
        self._partial = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- file protocol -----------------------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self.run_log.write(text)
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self.run_log.closed:
                self.run_log.flush()
            if self.task_log:
                self.task_log.flush()

    # -- events --------------------------------------------------------------------------------------

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        started = _START.search(line)
        if started and not line.startswith(" "):
            self._begin(started.group(1))
        if self.task_log:
            self.task_log.write(line + "\n")
        ended = _END.search(line)
        if ended and not line.startswith(" "):
            self._end(ended.group(1), ended.group(2))

    def _begin(self, task: str) -> None:
        if self.task_log:
            self.task_log.close()
        self.current, self.task_started = task, time.monotonic()
        self.task_log = open(self.log_path(task), "w", encoding="utf-8")
        self._status()

    def _end(self, task: str, status: str) -> None:
        seconds = time.monotonic() - self.task_started
        if self.task_log:
            self.task_log.close()
            self.task_log = None
        self.current = None
        if status != "SUCCESS":
            self.failed = (task, status)
            self._print(f"[{len(self.done) + 1:>{len(str(self.total))}}/{self.total}] FAILED after {_fmt(seconds)}  "
                        f"{self.names.get(task, task)}")
            return
        self.done.append((task, seconds))
        self._print(f"[{len(self.done):>{len(str(self.total))}}/{self.total}] {_fmt(seconds):>6}  "
                    f"{self.names.get(task, task)}   ({self._progress()})")

    def _progress(self) -> str:
        elapsed = time.monotonic() - self.started
        left = self.total - len(self.done)
        text = f"{_fmt(elapsed)} elapsed"
        if self.done and left > 0:
            mean = sum(s for _, s in self.done) / len(self.done)
            text += f", about {_fmt(mean * left)} left"
        return text

    # -- output --------------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
        self.out.write(text + "\n")
        self._status()

    def _status(self) -> None:
        if not self.tty or self.current is None:
            self.out.flush()
            return
        running = time.monotonic() - self.task_started
        self.out.write(f"\r\x1b[2K  running {self.names.get(self.current, self.current)} for {_fmt(running)}  "
                       f"[{len(self.done)}/{self.total} done, {self._progress()}]")
        self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                self._status()

    def start(self) -> "LiveView":
        self.started = time.monotonic()
        self.out.write(f"running {self.total} tasks with kfp.local; full logs in {self.log_dir}/\n")
        self.out.flush()
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="lmcompose-live-view", daemon=True)
            self._ticker.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join(timeout=2)
        with self._lock:
            if self._partial:
                self._line(self._partial)
                self._partial = ""
            if self.task_log:
                self.task_log.close()
                self.task_log = None
            self.run_log.close()
            if self.tty:
                self.out.write("\r\x1b[2K")
                self.out.flush()
        super().close()

    # -- results -------------------------------------------------------------------------------------

    def log_path(self, task: str) -> Path:
        return self.log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.log"

    def interrupted(self) -> None:
        """The run stopped with an exception: the task that was running is the one that failed."""
        with self._lock:
            if self.failed is None and self.current is not None:
                self.failed = (self.current, "FAILURE")
                self._print(f"[{len(self.done) + 1:>{len(str(self.total))}}/{self.total}] FAILED after "
                            f"{_fmt(time.monotonic() - self.task_started)}  {self.names.get(self.current, self.current)}")
                self.current = None

    def failure(self) -> RunFailed:
        """The error to end a failed run with: the failing task, its own error line, its log's path."""
        if self.failed is None:
            return RunFailed(f"the local run failed before a task did; see {self.log_dir / 'run.log'}")
        task, status = self.failed
        path = self.log_path(task)
        error = task_error(path.read_text(encoding="utf-8", errors="replace") if path.is_file() else "")
        return RunFailed(
            f"task {self.names.get(task, task)!r} ({task}) finished with status {status}:\n  {error}\n"
            f"its full log: {path}"
        )


def task_error(log: str) -> str:
    """The most telling error line of a task's log: the last exception line of its last traceback."""
    lines = [line.strip() for line in log.splitlines()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    if errors:
        return errors[-1]
    tail = [line for line in lines if line]
    return tail[-1] if tail else "(no output)"
