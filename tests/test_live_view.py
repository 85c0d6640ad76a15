"""The concise view of a local run: one line per task, logs in files, a failure's own error last."""

from __future__ import annotations

import io
from pathlib import Path

from pipelines.live_view import LiveView, task_error

KFP_LINES = """\x1b[96m12:00:00.000 - INFO - Executing task \x1b[96m'prepare-base'\x1b[0m
12:00:00.001 - INFO - Streamed logs:
    [KFP Executor] Got executor_input: {"inputs": {"parameterValues": {"model_source": "builtin:tiny-random"}}}
    [KFP Executor] base model stored
12:00:02.000 - INFO - Task 'prepare-base' finished with status \x1b[92mSUCCESS\x1b[0m
12:00:02.001 - INFO - Task 'prepare-base' outputs:
12:00:02.100 - INFO - Executing task 'ft'
12:00:02.101 - INFO - Streamed logs:
    Traceback (most recent call last):
      File "shared/interventions/ft.py", line 80, in apply
    ValueError: ft layers [0, 9] out of range: the model has 4 layers
"""


def test_one_line_per_task_and_the_failing_tasks_own_error(tmp_path: Path) -> None:
    out = io.StringIO()
    view = LiveView({"prepare-base": "base model", "ft": "ft", "evaluate": "eval ft"}, tmp_path / "logs", out=out,
                    tty=False).start()
    view.write(KFP_LINES)
    view.interrupted()  # kfp.local raised: the running task failed
    view.close()
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("running 3 tasks with kfp.local")
    assert shown[1].startswith("[1/3]") and "base model" in shown[1] and "elapsed" in shown[1]
    assert shown[2].startswith("[2/3] FAILED") and shown[2].endswith("ft")
    assert not any("executor_input" in line for line in shown)  # kfp.local's dumps stay in the logs
    logs = tmp_path / "logs"
    assert "executor_input" in (logs / "prepare-base.log").read_text()
    assert "executor_input" in (logs / "run.log").read_text()
    message = str(view.failure())
    assert "ValueError: ft layers [0, 9] out of range" in message
    assert str(logs / "ft.log") in message and "task 'ft' (ft)" in message


def test_task_error_picks_the_last_exception_line() -> None:
    log = "noise\nTraceback\n  File x\nshared.store.CorruptCheckpoint: ckpt/1: file a does not match\nmore noise\n"
    assert task_error(log) == "shared.store.CorruptCheckpoint: ckpt/1: file a does not match"
    assert task_error("only this\n") == "only this"
