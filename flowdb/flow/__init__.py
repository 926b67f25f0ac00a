"""Feature flow on disk, the second stage: exact top-k matching on any backend (matching),
one layer matched and classified (build), spread over Ray (cluster), the resumable Parquet
flow atlas (atlas), link atlases between two packs (link_atlas), and the CPU check (doctor).
Nothing here talks to Neo4j."""
