"""`imagewarm demo`: the main job, end to end on a local cluster (grows with each issue)."""

from imagewarm.cli import not_landed

command = not_landed("imagewarm demo", "issue 3, the local cluster")
