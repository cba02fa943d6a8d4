"""What a starting plane routes (serving/plane/reconcile.py): its state file against the
registry's champion, the registry having the last word."""

import pytest

from serving.plane.reconcile import Routing, reconcile
from serving.plane.state import PlaneError, RoutingState


def test_a_fresh_plane_serves_the_champion_and_needs_one():
    assert reconcile(None, "3", "m") == (Routing("3"), [])
    with pytest.raises(PlaneError, match="model 'm' has no champion yet: run `make pipeline` first"):
        reconcile(None, None, "m")


def test_the_state_is_kept_while_the_registry_agrees():
    state = RoutingState("3", "4", 0.25, True)
    assert reconcile(state, "3", "m") == (Routing("3", "4", 0.25, True), [])
    assert reconcile(state, None, "m")[0] == Routing("3", "4", 0.25, True), "no champion: the state is all there is"


def test_a_promotion_the_registry_recorded_while_the_plane_was_down_is_finished():
    routing, why = reconcile(RoutingState("3", "4", 0.5, False), "4", "m")
    assert routing == Routing("4")
    assert why == [("reconcile", {"why": "the registry promoted version 4 while the plane was down: it is stable now", "previous": "3"})]


def test_a_champion_moved_elsewhere_is_served_and_the_canary_dropped():
    routing, why = reconcile(RoutingState("3", "4", 0.5, True), "2", "m")
    assert routing == Routing("2") and why[0][1]["dropped_canary"] == "4"
