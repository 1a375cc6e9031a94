"""imagewarm controller (see DESIGN.md)."""
