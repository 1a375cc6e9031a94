"""`imagewarm controller`: not built yet; it says so rather than pretending."""

from imagewarm.command import not_landed

command = not_landed("imagewarm controller", "the controller issue")
