"""The serving plane: the gateway on `serve.port` and the engine processes behind it, kept running.

`make serve` (`python -m serving.plane`) starts the champion's engines (`serve.replicas`) behind
the gateway, the one public OpenAI-compatible endpoint, and keeps them running. Every release
goes into a plane: the one `make serve` runs, or a temporary one the release starts for itself
(`serving.plane.temporary`). One idea per file:

- `engines.py`: an engine process of a version (start, health, the cores it may use);
- `adoption.py`: engines a crashed plane left running, adopted or stopped;
- `state.py`: the routing state file, the event history, the plane's own traffic key;
- `reconcile.py`: what a starting plane routes, from its state file and the registry (pure);
- `operations.py`: `Plane`, the engines and routing and the admin API's verbs on them;
- `supervisor.py`: restarts an engine that exits or stops answering;
- `app.py`: the gateway app with the admin routes; its shutdown stops the engines;
- `targets.py`: what Prometheus scrapes (`<state_dir>/targets.json`, rewritten on every change);
- `temporary.py`: a plane in this process for one release, on a free loopback port;
- `__main__.py`: the command line (`make serve`).

The routing state (stable and canary versions, weight, mirroring, each replica's URL and pid) is
written to `<state_dir>/state.json` on every change. A plane restarted after a crash adopts the
engines still running from that file (they run in their own process groups) and routes exactly
as before; after a clean stop (Ctrl-C or SIGTERM, which stop every engine it started) it starts
the same versions again. On start, the registry has the last word on the champion.
"""

from serving.plane.app import create_plane_app
from serving.plane.engines import Replica, healthy
from serving.plane.operations import STATE_DIR, Plane, champion_version
from serving.plane.state import PlaneError, RoutingState

__all__ = ["STATE_DIR", "Plane", "PlaneError", "Replica", "RoutingState", "champion_version", "create_plane_app", "healthy"]
