"""Paper methods as loops and transforms over the core (DESIGN.md, loop seam)."""
