"""Issued cards, so that feedback can name them, and the feedback received.

In memory and per replica, bounded (oldest forgotten first). With the audit trail's database
(`audit_url`) the cards are shared too (shared.py), so feedback reaches any replica; without it,
feedback for a card this replica never issued, or has forgotten, is refused with 404
(`UnknownCardError`) and nothing is recorded: route a client's feedback to the replica that
answered (session affinity), or read a 404 as "unknown here".
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from service.clinical.cards import OVERRIDE_REASONS, OVERRIDE_SYSTEM
from service.clinical.hooks import FeedbackItem
from service.errors import InvalidInputError, UnknownCardError


@dataclass(frozen=True)
class Record:
    card: str
    service: str
    suggestion: str  # "" for an information card: no suggestion and no override reasons
    model: str
    version: str
    digest: str
    hook_instance: str
    referred: bool


@dataclass(frozen=True)
class Outcome:
    """One feedback item as recorded (and logged): no free text, which may identify people."""

    card: str
    service: str
    outcome: str
    model: str
    version: str
    referred: bool
    override_reason: str | None
    accepted_suggestions: int
    timestamp: str


class Ledger:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._cards: OrderedDict[str, Record] = OrderedDict()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (service, outcome) -> count

    def __len__(self) -> int:
        return len(self._cards)

    def issue(self, record: Record) -> None:
        self._cards[record.card] = record
        while len(self._cards) > self.capacity:
            self._cards.popitem(last=False)

    def get(self, card: str) -> Record | None:
        return self._cards.get(card)

    def check(self, service: str, items: list[FeedbackItem]) -> list[Outcome]:
        """Every item's outcome, counting none (404 unknown card, 400 inconsistent)."""
        found = []
        for n, item in enumerate(items):
            rec = self._cards.get(item.card)
            if rec is None or rec.service != service:
                raise UnknownCardError(
                    f"feedback[{n}]: card {item.card} was not issued by service '{service}' on "
                    "this replica, or is too old to be remembered",
                    [
                        {
                            "severity": "error",
                            "code": "not-found",
                            "diagnostics": f"card {item.card}",
                        }
                    ],
                )
            accepted = [s.id for s in item.acceptedSuggestions or []]
            if item.outcome == "overridden" and accepted:
                raise InvalidInputError(
                    f"feedback[{n}]: an overridden card has no accepted suggestions"
                )
            if item.outcome == "accepted" and item.overrideReason is not None:
                raise InvalidInputError(f"feedback[{n}]: overrideReason is for overridden cards")
            unknown = [s for s in accepted if s != rec.suggestion]
            if unknown:
                raise InvalidInputError(
                    f"feedback[{n}]: card {item.card} has no suggestion(s) {unknown}"
                )
            reason = item.overrideReason.reason if item.overrideReason else None
            offered = (
                {(OVERRIDE_SYSTEM, c) for c, _ in OVERRIDE_REASONS} if rec.suggestion else set()
            )
            if reason is not None and (reason.system, reason.code) not in offered:
                # CDS Hooks: the reason is one the card listed; free text goes in userComment.
                raise InvalidInputError(
                    f"feedback[{n}]: overrideReason ({reason.system} {reason.code}) is not one "
                    f"card {item.card} offered: "
                    + (
                        ", ".join(c for c, _ in OVERRIDE_REASONS) + f" of {OVERRIDE_SYSTEM}"
                        if offered
                        else "it offered none (use userComment)"
                    )
                )
            found.append(
                Outcome(
                    card=rec.card,
                    service=service,
                    outcome=item.outcome,
                    model=rec.model,
                    version=rec.version,
                    referred=rec.referred,
                    override_reason=reason.code if reason else None,
                    accepted_suggestions=len(accepted),
                    timestamp=item.outcomeTimestamp,
                )
            )
        return found

    def count(self, found: list[Outcome]) -> None:
        """Count checked outcomes, once they are recorded (routes.feedback)."""
        for o in found:
            self.outcomes[(o.service, o.outcome)] += 1
