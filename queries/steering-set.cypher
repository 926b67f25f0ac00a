// name: steering-set
// answers: The features to steer with, from a seed: the flow graph's residual chain and its
// answers: MLP/attention inputs, one row per feature, with the layer offset from the seed and the
// answers: cosine that ties it into the graph (1.0 for the seed), which coefficient schedules read.
// param: feature string required  the seed feature, PACK/LAYER/MODULE/INDEX
// param: t_res float 0.5  residual chain cut-off
// param: t_mod float 0.15  MLP/attention cut-off
// param: max_rank int 1  use only edges of rank at most max_rank
// columns: layer, offset, key, module, index, role, score, label
MATCH (seed:Feature {key: $feature})
CALL (seed) {
  MATCH (seed)<-[back:RESIDUAL*0..]-(a:Feature)
  WHERE all(r IN back WHERE r.cosine >= $t_res AND r.rank <= $max_rank)
  RETURN a AS member, CASE size(back) WHEN 0 THEN 1.0 ELSE last(back).cosine END AS score
  UNION
  MATCH (seed)-[fwd:RESIDUAL|MLP|ATTENTION*1..]->(d:Feature)
  WHERE all(r IN fwd WHERE r.rank <= $max_rank
            AND r.cosine >= CASE type(r) WHEN 'RESIDUAL' THEN $t_res ELSE $t_mod END)
  RETURN d AS member, last(fwd).cosine AS score
}
WITH seed, member, max(score) AS score
WITH seed, collect({node: member, score: score}) AS chain
CALL (chain) {
  UNWIND chain AS c
  WITH c.node AS step, [x IN chain | x.node] AS residual
  MATCH (p:Feature)-[e:MLP|ATTENTION]->(step)
  WHERE e.rank <= $max_rank AND e.cosine >= $t_mod AND NOT p IN residual
  RETURN p AS member, max(e.cosine) AS score
}
WITH seed, chain, collect({node: member, score: score}) AS inputs
WITH seed, chain + inputs AS members
UNWIND members AS m
WITH seed, m.node AS n, max(m.score) AS score
RETURN n.layer AS layer, n.layer - seed.layer AS offset, n.key AS key, n.module AS module,
       n.index AS index,
       CASE WHEN n = seed THEN 'seed' WHEN n.module <> 'res' THEN 'input'
            WHEN n.layer < seed.layer THEN 'ancestor' ELSE 'descendant' END AS role,
       score, n.label AS label
ORDER BY layer, module DESC, score DESC
