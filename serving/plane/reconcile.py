"""What a starting plane routes: its state file against the registry's champion. A pure
function (tests/serving/plane/test_reconcile.py): the registry has the last word.

- No state (or a state without a stable version): serve the champion.
- The state's stable is the champion: route exactly as the state says (canary, weight, mirror).
- The state's canary is the champion: the registry promoted it while the plane was down (a
  release records the registry first, then tells the plane): finish that promotion.
- Anything else: the champion moved elsewhere (a rollback by hand, another release): serve it,
  and drop the canary the registry no longer holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.plane.state import PlaneError, RoutingState


@dataclass(frozen=True)
class Routing:
    stable: str
    canary: str | None = None
    weight: float = 0.0
    mirror: bool = False


def reconcile(state: RoutingState | None, champion: str | None, model: str) -> tuple[Routing, list[tuple[str, dict[str, Any]]]]:
    """(what to route, the events that say why it differs from the state file)."""
    if state is None or state.stable is None:
        if champion is None:
            raise PlaneError(f"model '{model}' has no champion yet: run `make pipeline` first")
        return Routing(champion), []
    if champion is None or state.stable == champion:
        return Routing(state.stable, state.canary, state.weight if state.canary else 0.0, state.mirror and state.canary is not None), []
    if state.canary == champion:
        why = f"the registry promoted version {state.canary} while the plane was down: it is stable now"
        return Routing(champion), [("reconcile", {"why": why, "previous": state.stable})]
    why = f"the registry's champion is version {champion}, not {state.stable}: serving it"
    return Routing(champion), [("reconcile", {"why": why, "dropped_canary": state.canary})]
