"""Phase 2, EvoMerge: evolve merges of several models into a champion."""
