"""The Neo4j store, the third stage: the managed server (server), a connection (database),
the graph's schema and writes (graph), ingest over Bolt (ingest) and by neo4j-admin (bulk),
link sets (links), labels, search, export, and the read-only guard and query templates."""
