"""The codes a solve reports, with what each means. They travel through ``jit`` as int32."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
  """How the convex solve (and so the whole call) ended; ``int(result.status)``."""

  SUCCESSFUL = 0
  MAX_STEPS_REACHED = 1
  NONFINITE = 2
  NO_FINITE_CLIENTS = 3

  @property
  def message(self) -> str:
    return _STATUS_MESSAGES[self]


_STATUS_MESSAGES = {
    Status.SUCCESSFUL: "converged: the low-rank iterate moved less than tol",
    Status.MAX_STEPS_REACHED: ("stopped at max_steps before reaching tol; the verdicts come "
                               "from the trimming loop and usually stand, but raise max_steps "
                               "or tol if the scores sit near their thresholds"),
    Status.NONFINITE: ("the iterates stopped being finite (an overflow); the last finite "
                       "split was kept"),
    Status.NO_FINITE_CLIENTS: "no client has finite updates: there is nothing to aggregate",
}


class Start(enum.IntEnum):
  """Where the benign set came from (``ClairResult.start``)."""

  CONVEX = 0       # trimming started from the convex split
  CONSENSUS = 1    # from the client-count consensus search
  COMPLEMENT = 2   # from the complement of the consensus


def status_name(code) -> str:
  """``"successful"``, ``"max_steps_reached"``, ... for an int status code."""
  return Status(int(code)).name.lower()
