"""imagewarm: container images pulled once per cluster, served from the node, warmed ahead of need.

This package is the shared core (image references, API types, Kubernetes helpers, config, logs,
metrics, certificates, the CLI and the local cluster). It imports none of the three programs.
"""

__version__ = "0.1.0"
