"""Stage 4, post-processing: KDE grids of continuous values and times, drawing them into sampled shards, and
calendar-consistent dating. No torch here.

kde_config (the KDE config) <- grids (fitting) <- draw (values and times into a shard); calendar_tables <- dating
(dates that agree with the calendar tokens); stage: the kde-grids and kde-sample stage functions. Grid methods
and their registry: axes. docs/kde.md, docs/temporal.md."""
