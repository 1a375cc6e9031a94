"""imagewarm proxy (see DESIGN.md)."""
