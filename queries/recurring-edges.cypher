// name: recurring-edges
// answers: Links from one transcoder feature to another feature or to an output logit (the same layer and
// answers: feature id on both ends, as the graph files give them) found in at least min_graphs attribution
// answers: graphs: in how many graphs, how many links in all (a feature active at several positions gives
// answers: a link per pair of positions), and their mean weight.
// param: min_graphs int 2  found in at least this many graphs
// param: scan string null  only graphs of this model (their metadata.scan; default: every graph)
// param: limit int 100  at most this many edges, those in most graphs first
// columns: source_layer, source_feature, target_kind, target_layer, target_feature, graphs, links, mean_weight
MATCH (s:GraphNode {kind: 'feature'})-[r:ATTRIBUTES]->(t:GraphNode)
WHERE t.kind IN ['feature', 'logit']
  AND ($scan IS NULL OR EXISTS { MATCH (g:AttributionGraph {slug: s.graph}) WHERE g.scan = $scan })
WITH s.layer AS source_layer, s.feature AS source_feature, t.kind AS target_kind, t.layer AS target_layer,
     t.feature AS target_feature, count(DISTINCT s.graph) AS graphs, count(r) AS links, avg(r.weight) AS mean_weight
WHERE graphs >= $min_graphs
RETURN source_layer, source_feature, target_kind, target_layer, target_feature, graphs, links, mean_weight
ORDER BY graphs DESC, abs(mean_weight) DESC, toInteger(source_layer), source_feature, target_kind,
         toInteger(target_layer), target_feature
LIMIT $limit
