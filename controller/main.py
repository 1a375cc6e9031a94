"""`imagewarm controller`'s entry point, kept light: the CLI imports every program's command to
build its parser, so importing the controller itself here (its metrics are created at import)
would create the controller's metrics in whatever program runs, e.g. in the proxy's
PROMETHEUS_MULTIPROC_DIR. The program is `controller.app`.
"""

from __future__ import annotations

from controller.config import ControllerConfig
from imagewarm.command import Command


def run(config: ControllerConfig) -> int:
    from controller import app

    return app.run(config)


command = Command(
    help="the controller: NodeImages for Nodes, ImagePullJobs to NodeImage tasks, SidecarSet pre-pulls, "
    "CachedImages for images in use",
    config=ControllerConfig,
    run=run,
)
