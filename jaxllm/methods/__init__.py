"""Paper methods as loops and transforms over the core (the loop seam of the README's seam table)."""
