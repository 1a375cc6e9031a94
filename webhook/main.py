"""`imagewarm webhook`: not built yet; it says so rather than pretending."""

from imagewarm.cli import not_landed

command = not_landed("imagewarm webhook", "issue 5, the admission webhook")
