"""What runs write and draw: per-image results, maps, overlays and score tables (``writers``), figures
(``figures``), atomic files and hashes (``outputs``) and the evaluation report (``report``)."""
