"""Classified sandbox errors: every failure has a ``kind`` you can branch on.

>>> from moondev_lab.sandbox.errors import ErrorKind, SandboxError
>>> err = SandboxError(ErrorKind.TIMEOUT, "TimeoutError", "wall timeout of 2.0 s exceeded")
>>> err.kind == "timeout"
True

The debug loop feeds ``type`` and ``message`` (the strategy's real exception)
back to the model; ``kind`` says whether the sandbox or the strategy failed.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from ..errors import MoondevError


class ErrorKind(str, enum.Enum):
    """Why a sandboxed task failed. A ``str`` enum, so ``kind == "timeout"`` works."""

    # The code itself.
    SYNTAX_ERROR = "syntax_error"            # ast/compile failed
    NO_STRATEGY = "no_strategy"              # no (or no unambiguous) Strategy subclass
    IMPORT_ERROR = "import_error"            # imports a module the sandbox lacks
    STRATEGY_ERROR = "strategy_error"        # an exception raised by the strategy / backtest
    DATA_ERROR = "data_error"                # the DataRef could not be loaded
    # The sandbox stopping it.
    TIMEOUT = "timeout"                      # wall-clock limit; the process group was killed
    CPU_LIMIT = "cpu_limit"                  # RLIMIT_CPU (SIGXCPU)
    MEMORY_LIMIT = "memory_limit"            # RLIMIT_AS (MemoryError) or killed for memory
    PROCESS_LIMIT = "process_limit"          # RLIMIT_NPROC / pids cgroup: fork refused
    FILE_TOO_LARGE = "file_too_large"        # RLIMIT_FSIZE
    FORBIDDEN_NETWORK = "forbidden_network"  # socket use
    FORBIDDEN_FILE_WRITE = "forbidden_file_write"  # writing outside the working directory
    FORBIDDEN_PROCESS = "forbidden_process"  # os.fork / subprocess / exec from Python
    EXITED = "exited"                        # sys.exit / os._exit / died without a result
    KILLED = "killed"                        # killed by a signal we did not send
    # The sandbox itself.
    RESULT_INVALID = "result_invalid"        # the child's result could not be decoded
    RESULT_MISMATCH = "result_mismatch"      # its claimed stats differ from the trusted settlement (or cannot be settled)
    WORKER_CRASHED = "worker_crashed"        # the warm worker died mid-task (it is replaced)
    INTERNAL_ERROR = "internal_error"        # a bug in the harness: please report


@dataclass
class SandboxError:
    """One classified failure. ``type``/``message`` are the underlying exception's."""

    kind: ErrorKind
    type: str
    message: str
    traceback: str = ""

    def __post_init__(self) -> None:
        self.kind = ErrorKind(self.kind)

    def __str__(self) -> str:
        return f"[{self.kind.value}] {self.type}: {self.message}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SandboxError":
        return cls(ErrorKind(d["kind"]), str(d.get("type", "")), str(d.get("message", "")),
                   str(d.get("traceback", "")))


class SandboxViolation(MoondevError, PermissionError):
    """Raised inside the sandbox when code tries something forbidden.

    A ``PermissionError`` so that library code that handles ``OSError``
    (e.g. optional caches) degrades gracefully instead of crashing.
    """

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = ErrorKind(kind)


class SandboxPoolClosed(MoondevError, RuntimeError):
    """The pool was closed; create a new one."""
