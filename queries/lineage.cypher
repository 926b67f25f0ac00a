// name: lineage
// answers: Where a feature comes from: every step back along its residual chain to the
// answers: origin, with the residual, MLP and attention predecessors of each step.
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX (a residual one)
// feature: res
// param: t_res float null  residual cut-off (default: the thresholds stored with the build)
// param: t_mod float null  MLP/attention cut-off (default: the thresholds stored with the build)
// param: max_rank int 1  use only each feature's top max_rank matches per module
// param: every_edge bool false  follow every stored edge, whatever its cosine
// columns: depth, step_key, step_layer, step_category, step_label, kind, pred_key, pred_layer, pred_module, pred_index, cosine, rank, pred_label, pred_url
MATCH (f:Feature {key: $feature})
MATCH (f)<-[chain:RESIDUAL*0..]-(step:Feature)
WHERE all(r IN chain WHERE r.rank <= $max_rank AND ($every_edge OR coalesce(r.cosine >= $t_res, r.above)))
WITH DISTINCT f, step
// OPTIONAL: a step with no kept predecessor (a feature from nowhere) still has its row.
OPTIONAL MATCH (pred:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(step)
WHERE e.rank <= $max_rank
  AND ($every_edge OR CASE type(e) WHEN 'RESIDUAL' THEN coalesce(e.cosine >= $t_res, e.above) ELSE coalesce(e.cosine >= $t_mod, e.above) END)
RETURN f.layer - step.layer AS depth, step.key AS step_key, step.layer AS step_layer,
       step.category AS step_category, step.label AS step_label, toLower(type(e)) AS kind,
       pred.key AS pred_key, pred.layer AS pred_layer, pred.module AS pred_module,
       pred.index AS pred_index, e.cosine AS cosine, e.rank AS rank, pred.label AS pred_label,
       COLLECT { MATCH (s:SAE {key: pred.pack + '/' + toString(pred.layer) + '/' + pred.module}) RETURN s.np_url + toString(pred.index) }[0] AS pred_url
ORDER BY depth, step_key, kind, rank
