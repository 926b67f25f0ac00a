// name: lineage
// answers: Where a feature comes from: every step back along its residual chain to the
// answers: origin, with the residual, MLP and attention predecessors of each step.
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
// param: t_res float -1.0  follow and report residual edges only at or above this cosine
// param: t_mod float -1.0  report MLP and attention edges only at or above this cosine
// param: max_rank int 1  use only each feature's top max_rank matches per module
// columns: depth, step_key, step_layer, step_category, step_label, kind, pred_key, pred_layer, pred_module, pred_index, cosine, rank, pred_label, pred_url
MATCH (f:Feature {key: $feature})
MATCH (f)<-[chain:RESIDUAL*0..]-(step:Feature)
WHERE all(r IN chain WHERE r.cosine >= $t_res AND r.rank <= $max_rank)
WITH DISTINCT f, step
MATCH (pred:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(step)
WHERE e.rank <= $max_rank
  AND e.cosine >= CASE type(e) WHEN 'RESIDUAL' THEN $t_res ELSE $t_mod END
RETURN f.layer - step.layer AS depth, step.key AS step_key, step.layer AS step_layer,
       step.category AS step_category, step.label AS step_label, toLower(type(e)) AS kind,
       pred.key AS pred_key, pred.layer AS pred_layer, pred.module AS pred_module,
       pred.index AS pred_index, e.cosine AS cosine, e.rank AS rank, pred.label AS pred_label,
       COLLECT { MATCH (s:SAE {key: pred.pack + '/' + toString(pred.layer) + '/' + pred.module}) RETURN s.np_url + toString(pred.index) }[0] AS pred_url
ORDER BY depth, step_key, kind, rank
