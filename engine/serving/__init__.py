"""What runs in the engine process, or in a Ray replica: one engine served over a pipe or a
deployment handle (docs/architecture.md, "Which process runs which folder")."""
