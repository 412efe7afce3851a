"""Stage 4, post-processing: KDE grids of continuous values and times, drawing them into sampled shards, and
calendar-consistent dating. No torch here."""
