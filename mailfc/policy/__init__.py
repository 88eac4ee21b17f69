"""Flow limits and admin blocks: the vocabulary and (later) the engine."""
