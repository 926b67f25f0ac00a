// name: graphs-with
// answers: The attribution graphs that hold one transcoder feature, given by its layer and feature id as
// answers: the graph files give them (a node's layer and feature fields): the positions it is active at,
// answers: its largest influence and activation there, and whether a path of links from one of its nodes
// answers: reaches the graph's target logit.
// param: layer string required  the feature's layer, as the graph files write it ("12")
// param: feature_id int required  the feature's id: a node's feature field (circuit-tracer Cantor-pairs layer and index)
// columns: graph, prompt, positions, influence, activation, reaches_target
MATCH (n:GraphNode {kind: 'feature', layer: $layer, feature: $feature_id})
WITH n ORDER BY n.ctx_idx
WITH n.graph AS graph, collect(n) AS nodes, collect(n.ctx_idx) AS positions,
     max(n.influence) AS influence, max(n.activation) AS activation
MATCH (g:AttributionGraph {slug: graph})
RETURN graph, g.prompt AS prompt, positions, influence, activation,
       EXISTS { MATCH (m:GraphNode)-[:ATTRIBUTES*1..]->(:GraphNode {graph: graph, is_target_logit: true})
                WHERE m IN nodes } AS reaches_target
ORDER BY graph
