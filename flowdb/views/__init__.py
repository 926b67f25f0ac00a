"""What people look at, the fifth stage: pictures (plots), the graph JSON Neuronpedia's
viewer reads (graph_json), and the marks both the pictures and the explorer draw (marks)."""
