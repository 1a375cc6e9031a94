"""imagewarm webhook (see DESIGN.md)."""
