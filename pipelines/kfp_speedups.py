"""Work-arounds for costs inside kfp itself, kept apart from the pipeline builder that uses them."""

import contextlib
import inspect
import sys
import types
from typing import Any, Iterator


@contextlib.contextmanager
def kfp_setters_without_source_lookup() -> Iterator[None]:
    """Let kfp's task setters find their caller's name without reading every frame's source.

    ``PipelineTask.set_cpu_request`` and seven other setters call
    ``inspect.stack()`` only to name the setter in an error message; that call
    reads the source context of every frame on the stack and, per frame, scans
    all of ``sys.modules``.  Placing a task calls eight such setters, so
    compiling the 40-shard editing x compression study spent 13 of its 40 s
    there (``lmcompose compile``), and a compile inside a process that has
    imported transformers and lm-eval (the test suite) three quarters of its
    time.  Inside this block the module's ``inspect.stack`` returns the same
    frames without source context (the only field kfp reads, the function
    name, is unchanged).  If kfp stops using ``inspect`` there, this does nothing.
    """
    from kfp.dsl import pipeline_task

    original = getattr(pipeline_task, "inspect", None)
    if original is not inspect:
        yield
        return
    pipeline_task.inspect = _INSPECT_WITHOUT_SOURCE
    try:
        yield
    finally:
        pipeline_task.inspect = original


def _stack_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without the source lines and module lookups (``code_context`` is None)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


class _InspectWithoutSource(types.ModuleType):
    """``inspect`` as seen by kfp.dsl.pipeline_task: everything forwarded, ``stack`` cheap."""

    stack = staticmethod(_stack_without_source)

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


_INSPECT_WITHOUT_SOURCE = _InspectWithoutSource("inspect")
