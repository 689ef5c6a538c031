"""Code that runs on cluster nodes: Ray runtime set-up, Ray tasks and actors for each stage."""
