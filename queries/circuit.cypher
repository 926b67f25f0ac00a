// name: circuit
// answers: How features connect: every edge on a directed path from one of the sources to one of
// answers: the targets (comma-separated references; order does not matter), within a layer range,
// answers: plus the MLP and attention features feeding each residual step on those paths.
// param: source string required  feature reference(s), comma-separated
// param: target string required  feature reference(s), comma-separated
// param: first_layer int 0  lowest layer a path may visit
// param: last_layer int 1000000  highest layer a path may visit
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  use only edges of rank at most max_rank
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: source_key, target_key, kind, cosine, rank, source_layer, target_layer, on_path, source_label, target_label
WITH [k IN split($source, ',') | trim(k)] + [k IN split($target, ',') | trim(k)] AS keys,
     [k IN split($source, ',') | trim(k)] AS sources, [k IN split($target, ',') | trim(k)] AS targets
MATCH (a:Feature) WHERE a.key IN sources
MATCH (b:Feature) WHERE b.key IN targets AND b <> a
WITH CASE WHEN a.layer <= b.layer THEN a ELSE b END AS lo, CASE WHEN a.layer <= b.layer THEN b ELSE a END AS hi
MATCH p = (lo)-[rs:RESIDUAL|MLP|ATTENTION*1..]->(hi)
WHERE all(r IN rs WHERE r.rank <= $max_rank
          AND ($every_edge OR CASE type(r) WHEN 'RESIDUAL' THEN coalesce(r.cosine >= $t_res, r.above) ELSE coalesce(r.cosine >= $t_mod, r.above) END))
  AND all(n IN nodes(p) WHERE $first_layer <= n.layer <= $last_layer)
UNWIND relationships(p) AS r
WITH collect(DISTINCT r) AS path_edges
CALL (path_edges) {
  UNWIND path_edges AS r
  RETURN r AS edge, true AS on_path
  UNION
  UNWIND path_edges AS r
  WITH endNode(r) AS step
  MATCH (:Feature)-[e:MLP|ATTENTION]->(step)
  WHERE e.rank <= $max_rank AND ($every_edge OR coalesce(e.cosine >= $t_mod, e.above)) AND NOT e IN path_edges
  RETURN e AS edge, false AS on_path
}
WITH startNode(edge) AS s, endNode(edge) AS t, edge, on_path
RETURN s.key AS source_key, t.key AS target_key, toLower(type(edge)) AS kind, edge.cosine AS cosine,
       edge.rank AS rank, s.layer AS source_layer, t.layer AS target_layer, on_path,
       s.label AS source_label, t.label AS target_label
ORDER BY target_layer, on_path DESC, target_key, kind
