"""The application layer's own typed errors, beside the domain's (``core.domain.errors``), which its
operations raise too: an unknown task or approval is ``NotFound``, a role that may not act is
``NotPermitted``, input the operation refuses is ``InvalidCommand``. The gateway maps them all to HTTP in
one place (``gateway/problems.py``), by ``kind``."""

from __future__ import annotations

from core.domain.errors import Rejected


class PolicyUnavailable(Rejected):
    """The submit policy could not decide (its engine failed or overran the budget); nothing was
    submitted, and the same submission may be decided later."""

    kind = "unavailable"
