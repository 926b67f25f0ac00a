// name: strongest-paths
// answers: The strongest paths from an input token to the target logit of one attribution graph: a path's
// answers: weight is the product of its links' weights, largest first. Paths have at most max_length links
// answers: (the template follows at most 8), and follow only links whose absolute weight is at least
// answers: min_weight; on a large graph raise min_weight to keep the search small.
// param: graph string required  the graph's slug (flowdb circuits list)
// param: max_length int 6  at most this many links in a path (at most 8 are followed)
// param: min_weight float 0.0  follow only links whose absolute weight is at least this
// param: limit int 10  at most this many paths
// columns: source, token, length, path_weight, path, clerps
MATCH (g:AttributionGraph {slug: $graph})
MATCH (t:GraphNode {graph: $graph, is_target_logit: true})
MATCH p = (s:GraphNode {graph: $graph, kind: 'embedding'})-[rs:ATTRIBUTES*1..8]->(t)
WHERE size(rs) <= $max_length AND all(r IN rs WHERE abs(r.weight) >= $min_weight)
WITH g, s, p, reduce(w = 1.0, r IN rs | w * r.weight) AS path_weight
RETURN s.node_id AS source, g.prompt_tokens[s.ctx_idx] AS token, length(p) AS length, path_weight,
       [n IN nodes(p) | n.node_id] AS path, [n IN nodes(p) | n.clerp] AS clerps
ORDER BY path_weight DESC, path
LIMIT $limit
