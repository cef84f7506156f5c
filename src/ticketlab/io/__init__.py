"""What is kept and shown: the run folder, configs, reports, exports, summaries."""
