// name: recurring-features
// answers: Transcoder features found in at least min_graphs attribution graphs (flowdb circuits import),
// answers: a feature being its layer and feature id as the graph files give them: how many graphs hold it,
// answers: its mean influence and activation over its nodes there (one node per position it is active
// answers: at), and a label (the tied pack feature's, else the first non-empty clerp).
// param: min_graphs int 2  found in at least this many graphs
// param: scan string null  only graphs of this model (their metadata.scan; default: every graph)
// param: limit int 100  at most this many features, those in most graphs first
// columns: layer, feature, graphs, mean_influence, mean_activation, label
MATCH (n:GraphNode {kind: 'feature'})
WHERE $scan IS NULL OR EXISTS { MATCH (g:AttributionGraph {slug: n.graph}) WHERE g.scan = $scan }
WITH n.layer AS layer, n.feature AS feature, count(DISTINCT n.graph) AS graphs,
     avg(n.influence) AS mean_influence, avg(n.activation) AS mean_activation, collect(n) AS nodes
WHERE graphs >= $min_graphs
RETURN layer, feature, graphs, mean_influence, mean_activation,
       coalesce(COLLECT { UNWIND nodes AS m MATCH (m)-[:IS]->(f:Feature) WHERE f.label IS NOT NULL
                          RETURN f.label AS label ORDER BY m.graph, m.ctx_idx LIMIT 1 }[0],
                COLLECT { UNWIND nodes AS m WITH m WHERE m.clerp <> ''
                          RETURN m.clerp AS label ORDER BY m.graph, m.ctx_idx LIMIT 1 }[0]) AS label
ORDER BY graphs DESC, toInteger(layer), layer, feature
LIMIT $limit
