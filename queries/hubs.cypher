// name: hubs
// answers: The hubs of a pack's flow graph, by kind: fan-out, the features with the most outgoing
// answers: kept edges; fan-in, the residual features with the most incoming kept edges; chain-end,
// answers: the residual features where a kept residual chain ends (a kept residual edge in, none
// answers: out), degree being how many residual steps back the chain goes (its longest path).
// param: pack string required  the pack name
// param: kind string fan-out  fan-out, fan-in or chain-end
// choices: kind fan-out, fan-in, chain-end
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  count only edges of rank at most max_rank
// param: every_edge bool false  count every stored edge, whatever its cosine
// param: limit int 20  at most this many features, highest degree first
// columns: key, layer, module, category, degree, label, url
MATCH (f:Feature {pack: $pack})
WHERE f.layer IS NOT NULL
  AND ($kind <> 'chain-end' OR (f.module = 'res' AND NOT EXISTS {
        MATCH (f)-[r:RESIDUAL]->(:Feature)
        WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)) }))
WITH f, CASE $kind
  WHEN 'fan-out' THEN COUNT {
    MATCH (f)-[e:RESIDUAL|MLP|ATTENTION]->(:Feature)
    WHERE e.rank <= $max_rank
      AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END) }
  WHEN 'fan-in' THEN COUNT {
    MATCH (f)<-[e:RESIDUAL|MLP|ATTENTION]-(:Feature)
    WHERE e.rank <= $max_rank
      AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END) }
  WHEN 'chain-end' THEN COLLECT {
    MATCH p = (f)<-[rs:RESIDUAL*1..]-(:Feature)
    WHERE all(r IN rs WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
    RETURN length(p) AS steps ORDER BY steps DESC LIMIT 1 }[0]
END AS degree
WHERE degree > 0
RETURN f.key AS key, f.layer AS layer, f.module AS module, f.category AS category, degree, f.label AS label,
       COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/' + f.module}) RETURN s.np_url + toString(f.index) }[0] AS url
ORDER BY degree DESC, key
LIMIT $limit
