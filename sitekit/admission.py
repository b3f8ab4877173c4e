"""Who may open a connection: a cap on connections, failed authentications per address.

One `Admission` per listening server (the CEM's S2 server, the OCPP central system). It
answers, before a request is authenticated, whether to refuse it at once:

- more than `max_connections` open (or opening) connections: refused (HTTP 503), so a flood
  of clients cannot use up the process's file descriptors and memory;
- an address with `max_failed_auth_per_minute` failed authentications in the last minute:
  refused (HTTP 429) without looking at its credentials, until its failures age out.

Refusals are counted, not logged one by one: the first refusal of each reason in a minute
gets its own log line (so an operator sees a problem at once), the rest go into one summary
line a minute (`flush`, called by the server's timer and on every refusal) with the count per
reason and the addresses that were refused most.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000


@dataclass(frozen=True)
class Refusal:
    """Why a connection is refused before it is authenticated, and the HTTP answer."""

    status: int            # 503 (too many connections) or 429 (too many failures)
    reason: str            # plain words, for the log and the response body
    retry_after_s: int


class Admission:
    """Connection cap and failed-authentication limit of one server; refusal counting."""

    def __init__(self, what: str, logger: logging.Logger, *, max_connections: int,
                 max_failed_auth_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.logger = logger
        self.max_connections = max_connections
        self.max_failed_auth_per_minute = max_failed_auth_per_minute
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._window_start = clock()
        self._counts: Counter[str] = Counter()
        self._by_address: Counter[str] = Counter()
        self.refused_total = 0

    # --- decisions ------------------------------------------------------------------------

    def check(self, address: str, open_connections: int) -> Refusal | None:
        """Refuse before authentication? (None: go on and authenticate.)"""
        if open_connections >= self.max_connections:
            return Refusal(503, f"{open_connections} connections are open, the most "
                           f"{self.max_connections} allowed; try again later", 30)
        failures = self._recent(address)
        if failures is not None and len(failures) >= self.max_failed_auth_per_minute:
            return Refusal(429, f"{len(failures)} failed authentications from {address} in "
                           "the last minute; wait a minute", int(WINDOW_S))
        return None

    def failed(self, address: str) -> None:
        """A failed authentication (wrong token, wrong password, a claimed identity)."""
        failures = self._failures.get(address)
        if failures is None:
            failures = self._failures[address] = deque()
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        failures.append(self.clock())

    def refused(self, address: str, reason: str, line: str) -> None:
        """Count a refused attempt; log `line` only when it is the first of its `reason`
        in this minute (the summary counts the rest)."""
        self.flush()
        self.refused_total += 1
        first = self._counts[reason] == 0
        self._counts[reason] += 1
        self._by_address[address] += 1
        if first:
            self.logger.warning("%s", line)

    # --- the summary ----------------------------------------------------------------------

    def flush(self, now: float | None = None) -> str | None:
        """Log (and return) the summary of the minute that ended, if one did."""
        now = self.clock() if now is None else now
        if now - self._window_start < WINDOW_S:
            return None
        line = None
        total = sum(self._counts.values())
        if total > len(self._counts):  # some were not logged one by one
            ranked = self._counts.most_common()
            reasons = ", ".join(f"{count} {reason}" for reason, count in ranked[:5]) + (
                f" and {len(ranked) - 5} more reason(s)" if len(ranked) > 5 else "")
            top = ", ".join(f"{address} x{count}" for address, count in
                            self._by_address.most_common(3))
            line = (f"{self.what}: {total} connection attempt(s) refused in the last "
                    f"{(now - self._window_start) / 60:.0f} min: {reasons}; from {top}"
                    + (f" and {len(self._by_address) - 3} more address(es)"
                       if len(self._by_address) > 3 else ""))
            self.logger.warning("%s", line)
        self._counts.clear()
        self._by_address.clear()
        self._window_start = now
        return line

    def _recent(self, address: str) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        horizon = self.clock() - WINDOW_S
        while failures and failures[0] < horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures
