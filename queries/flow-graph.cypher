// name: flow-graph
// answers: The paper's flow graph of one feature (Laptev et al. 3.3, B.2): its residual chain
// answers: backward and forward, cut where a residual edge falls below t_res, plus the MLP and
// answers: attention features feeding each chain step at or above t_mod. Node rows and edge rows
// answers: in one result (element = node | edge); `flowdb plot flow` draws it.
// param: feature string required  the seed feature, PACK/LAYER/MODULE/INDEX
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  use only edges of rank at most max_rank
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: element, key, layer, module, index, category, label, url, role, source, target, kind, cosine
MATCH (seed:Feature {key: $feature})
CALL (seed) {
  MATCH (seed)<-[back:RESIDUAL*0..]-(a:Feature)
  WHERE all(r IN back WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
  RETURN a AS member
  UNION
  MATCH (seed)-[fwd:RESIDUAL|MLP|ATTENTION*1..]->(d:Feature)
  WHERE all(r IN fwd WHERE r.rank <= $max_rank
            AND ($every_edge OR CASE type(r) WHEN 'RESIDUAL' THEN coalesce(r.cosine >= $t_res, r.above) ELSE coalesce(r.cosine >= $t_mod, r.above) END))
  RETURN d AS member
}
WITH seed, collect(DISTINCT member) AS chain
CALL (seed, chain) {
  UNWIND chain AS c
  MATCH (p:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(c)
  WHERE e.rank <= $max_rank
    AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END) AND (type(e) <> 'RESIDUAL' OR p IN chain)
  RETURN collect({source: p, target: c, kind: toLower(type(e)), cosine: e.cosine}) AS links
}
WITH seed, links, chain + [l IN links | l.source] AS members
CALL (seed, members, links) {
  UNWIND members AS n
  WITH DISTINCT seed, n
  RETURN 'node' AS element, n.key AS key, n.layer AS layer, n.module AS module, n.index AS index,
         n.category AS category, n.label AS label,
         COLLECT { MATCH (s:SAE {key: n.pack + '/' + toString(n.layer) + '/' + n.module}) RETURN s.np_url + toString(n.index) }[0] AS url,
         CASE WHEN n = seed THEN 'seed' WHEN n.module <> 'res' THEN 'input'
              WHEN n.layer < seed.layer THEN 'ancestor' ELSE 'descendant' END AS role,
         null AS source, null AS target, null AS kind, null AS cosine
  UNION ALL
  UNWIND links AS l
  RETURN 'edge' AS element, null AS key, l.target.layer AS layer, null AS module, null AS index,
         null AS category, null AS label, null AS url, null AS role,
         l.source.key AS source, l.target.key AS target, l.kind AS kind, l.cosine AS cosine
}
RETURN element, key, layer, module, index, category, label, url, role, source, target, kind, cosine
ORDER BY element DESC, layer, key, source
