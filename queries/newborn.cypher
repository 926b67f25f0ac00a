// name: newborn
// answers: Residual features born in the MLP or attention of one layer (category newborn), best
// answers: first: the module feature each one comes from and how closely (top-1 cosine).
// param: pack string required  the pack name
// param: layer int required  the layer
// param: module string null  only those born in 'mlp' or 'att' (default: both)
// param: limit int 50  at most this many rows
// columns: key, label, url, born_in, kind, cosine, s_res, born_in_label
MATCH (f:Feature {pack: $pack, layer: $layer, module: 'res'})
WHERE f.category = 'newborn'
MATCH (p:Feature)-[e:MLP|ATTENTION]->(f)
WHERE e.rank = 1
WITH f, p, e ORDER BY e.cosine DESC
WITH f, collect({p: p, e: e})[0] AS best
WHERE $module IS NULL OR best.p.module = $module
RETURN f.key AS key, f.label AS label,
       COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/res'}) RETURN s.np_url + toString(f.index) }[0] AS url,
       best.p.key AS born_in, toLower(type(best.e)) AS kind, best.e.cosine AS cosine,
       f.s_res AS s_res, best.p.label AS born_in_label
ORDER BY cosine DESC, key
LIMIT $limit
