// name: label-search
// answers: Features whose Neuronpedia explanation contains a text (case-insensitive), with the
// answers: residual lineage of each (rank-1 residual ancestors at or above t_res, nearest first).
// param: text string required  text to look for in explanations
// param: pack string null  only this pack (default: all)
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: limit int 50  at most this many features
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: key, layer, module, category, label, matched, url, lineage
MATCH (e:Explanation)-[:EXPLAINS]->(f:Feature)
WHERE toLower(e.description) CONTAINS toLower($text) AND ($pack IS NULL OR f.pack = $pack)
WITH f, collect(DISTINCT e.description)[0] AS matched
ORDER BY f.pack, f.layer, f.module, f.index
LIMIT $limit
OPTIONAL MATCH (f)<-[chain:RESIDUAL*1..]-(a:Feature)
WHERE all(r IN chain WHERE r.rank = 1 AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
WITH f, matched, a ORDER BY a.layer DESC
WITH f, matched, collect(a.key) AS lineage
RETURN f.key AS key, f.layer AS layer, f.module AS module, f.category AS category, f.label AS label,
       matched, COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/' + f.module}) RETURN s.np_url + toString(f.index) }[0] AS url,
       lineage
ORDER BY layer, key
