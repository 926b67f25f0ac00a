"""Attribution graphs (circuit-tracer / Neuronpedia graph JSON) in the same Neo4j store.

schema.py reads and checks one graph file (every problem is one line naming the file
and the field; nothing of a bad file is stored); store.py writes graphs, lists,
deletes and exports them. The queries across graphs are templates in queries/
(recurring-features, graphs-with, recurring-edges, strongest-paths).
"""
