// The demo's feature: the last feature of the longest translated chain (rank-1 residual edges the
// build kept) that MLP or attention feed somewhere along it, so its lineage shows both; ties by key.
MATCH (end:Feature {pack: $pack, module: 'res'})
WHERE end.layer IS NOT NULL AND end.category = 'translated'
  AND NOT EXISTS { (end)-[r:RESIDUAL {rank: 1}]->(:Feature {category: 'translated'}) WHERE r.above }
MATCH p = (start:Feature)-[rs:RESIDUAL*1..]->(end)
WHERE all(r IN rs WHERE r.rank = 1 AND r.above) AND all(n IN tail(nodes(p)) WHERE n.category = 'translated')
  AND (start.category <> 'translated' OR NOT EXISTS { (:Feature)-[r:RESIDUAL {rank: 1}]->(start) WHERE r.above })
WITH end, length(p) AS steps,
     EXISTS { MATCH (:Feature)-[e:MLP|ATTENTION]->(step) WHERE step IN nodes(p) AND e.rank = 1 AND e.above } AS fed
RETURN end.key AS feature
ORDER BY fed DESC, steps DESC, end.key
LIMIT 1
