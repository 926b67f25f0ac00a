// name: steering-set
// answers: The features to steer with, from a seed: the flow graph's residual chain and its
// answers: MLP/attention inputs, one row per feature, with the layer offset from the seed and the
// answers: cosine that ties it into the graph (1.0 for the seed), which coefficient schedules read.
// param: feature string required  the seed feature, PACK/LAYER/MODULE/INDEX
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  use only edges of rank at most max_rank
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: layer, offset, key, module, index, role, score, label
MATCH (seed:Feature {key: $feature})
CALL (seed) {
  MATCH (seed)<-[back:RESIDUAL*0..]-(a:Feature)
  WHERE all(r IN back WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
  RETURN a AS member, CASE size(back) WHEN 0 THEN 1.0 ELSE last(back).cosine END AS score
  UNION
  MATCH (seed)-[fwd:RESIDUAL|MLP|ATTENTION*1..]->(d:Feature)
  WHERE all(r IN fwd WHERE r.rank <= $max_rank
            AND ($every_edge OR CASE type(r) WHEN 'RESIDUAL' THEN coalesce(r.cosine >= $t_res, r.above) ELSE coalesce(r.cosine >= $t_mod, r.above) END))
  RETURN d AS member, last(fwd).cosine AS score
}
WITH seed, member, max(score) AS score
WITH seed, collect({node: member, score: score}) AS chain
CALL (chain) {
  UNWIND chain AS c
  WITH c.node AS step, [x IN chain | x.node] AS residual
  MATCH (p:Feature)-[e:MLP|ATTENTION]->(step)
  WHERE e.rank <= $max_rank AND ($every_edge OR coalesce(e.cosine >= $t_mod, e.above)) AND NOT p IN residual
  WITH p, max(e.cosine) AS score
  // An aggregate answers one row even when no input qualifies, so the chain is kept.
  RETURN collect({node: p, score: score}) AS inputs
}
WITH seed, chain + inputs AS members
UNWIND members AS m
WITH seed, m.node AS n, max(m.score) AS score
RETURN n.layer AS layer, n.layer - seed.layer AS offset, n.key AS key, n.module AS module,
       n.index AS index,
       CASE WHEN n = seed THEN 'seed' WHEN n.module <> 'res' THEN 'input'
            WHEN n.layer < seed.layer THEN 'ancestor' ELSE 'descendant' END AS role,
       score, n.label AS label
ORDER BY layer, module DESC, score DESC
