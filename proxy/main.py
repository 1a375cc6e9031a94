"""`imagewarm proxy`: not built yet; it says so rather than pretending."""

from imagewarm.cli import not_landed

command = not_landed("imagewarm proxy", "issue 4, the node proxy")
