"""Domain-free helpers every stage may use: sparse/jagged structures, top-k with masking, atomic
files, the config error. Nothing here imports another part of the package."""
