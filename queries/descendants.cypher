// name: descendants
// answers: What a feature becomes: every residual feature downstream of it. f' at a later
// answers: layer descends from f when f is among f''s top max_rank predecessors (the forward rule).
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  follow only edges of rank at most max_rank
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: depth, parent_key, kind, child_key, child_layer, child_category, child_label, child_url, cosine, rank
MATCH (f:Feature {key: $feature})
MATCH (f)-[path:RESIDUAL|MLP|ATTENTION*1..]->(d:Feature)
WHERE all(r IN path WHERE r.rank <= $max_rank
          AND ($every_edge OR CASE type(r) WHEN 'RESIDUAL' THEN coalesce(r.cosine >= $t_res, r.above) ELSE coalesce(r.cosine >= $t_mod, r.above) END))
WITH f, collect(DISTINCT d) AS downstream
UNWIND downstream AS child
MATCH (parent:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(child)
WHERE (parent = f OR parent IN downstream) AND e.rank <= $max_rank
  AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END)
RETURN child.layer - f.layer AS depth, parent.key AS parent_key, toLower(type(e)) AS kind,
       child.key AS child_key, child.layer AS child_layer, child.category AS child_category,
       child.label AS child_label,
       COLLECT { MATCH (s:SAE {key: child.pack + '/' + toString(child.layer) + '/' + child.module}) RETURN s.np_url + toString(child.index) }[0] AS child_url,
       e.cosine AS cosine, e.rank AS rank
ORDER BY depth, child_key, kind, rank
