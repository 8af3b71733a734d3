"""Robot protocol and real-time control loops (see DESIGN.md; not built yet)."""
