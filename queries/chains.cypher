// name: chains
// answers: The longest persistent chains of a pack: runs of rank-1 residual edges along which
// answers: every feature after the first is translated (carried over, not processed or reborn).
// param: pack string required  the pack name
// param: limit int 20  at most this many chains, longest first
// columns: length, start_key, end_key, start_layer, end_layer, min_cosine, keys, start_label, end_label
MATCH (end:Feature {pack: $pack, module: 'res'})
WHERE end.layer IS NOT NULL AND end.category = 'translated'
  AND NOT EXISTS { (end)-[:RESIDUAL {rank: 1}]->(:Feature {category: 'translated'}) }
MATCH p = (start:Feature)-[rs:RESIDUAL*1..]->(end)
WHERE all(r IN rs WHERE r.rank = 1) AND all(n IN tail(nodes(p)) WHERE n.category = 'translated')
  AND (start.category <> 'translated'
       OR NOT EXISTS { (:Feature)-[:RESIDUAL {rank: 1}]->(start) })
RETURN length(p) AS length, start.key AS start_key, end.key AS end_key, start.layer AS start_layer,
       end.layer AS end_layer, reduce(m = 1.0, r IN rs | CASE WHEN r.cosine < m THEN r.cosine ELSE m END) AS min_cosine,
       [n IN nodes(p) | n.key] AS keys, start.label AS start_label, end.label AS end_label
ORDER BY length DESC, min_cosine DESC, end_key
LIMIT $limit
