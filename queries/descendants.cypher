// name: descendants
// answers: What a feature becomes: every residual feature downstream of it. f' at a later
// answers: layer descends from f when f is among f''s top max_rank predecessors (the forward rule).
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
// param: t_res float -1.0  follow residual edges only at or above this cosine
// param: t_mod float -1.0  follow MLP and attention edges only at or above this cosine
// param: max_rank int 1  follow only edges of rank at most max_rank
// columns: depth, parent_key, kind, child_key, child_layer, child_category, child_label, child_url, cosine, rank
MATCH (f:Feature {key: $feature})
MATCH (f)-[path:RESIDUAL|MLP|ATTENTION*1..]->(d:Feature)
WHERE all(r IN path WHERE r.rank <= $max_rank
          AND r.cosine >= CASE type(r) WHEN 'RESIDUAL' THEN $t_res ELSE $t_mod END)
WITH f, collect(DISTINCT d) AS downstream
UNWIND downstream AS child
MATCH (parent:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(child)
WHERE (parent = f OR parent IN downstream) AND e.rank <= $max_rank
  AND e.cosine >= CASE type(e) WHEN 'RESIDUAL' THEN $t_res ELSE $t_mod END
RETURN child.layer - f.layer AS depth, parent.key AS parent_key, toLower(type(e)) AS kind,
       child.key AS child_key, child.layer AS child_layer, child.category AS child_category,
       child.label AS child_label,
       COLLECT { MATCH (s:SAE {key: child.pack + '/' + toString(child.layer) + '/' + child.module}) RETURN s.np_url + toString(child.index) }[0] AS child_url,
       e.cosine AS cosine, e.rank AS rank
ORDER BY depth, child_key, kind, rank
